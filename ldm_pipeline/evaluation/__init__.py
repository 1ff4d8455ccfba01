"""Prompt-adherence checks for the shapes domain and captioned sample grids.

    from ldm_pipeline.evaluation import classify, evaluate, make_grid
    report = evaluate(zip(images, prompts))      # held-in / held-out accuracy, confusion matrices
    print(report.to_markdown())
    make_grid(images, prompts).save("grid.png")  # prompts written under the images
"""

from ldm_pipeline.evaluation.shapes import (
    Expected,
    Prediction,
    Report,
    classify,
    evaluate,
    parse_prompt,
    score,
    score_recolour,
)
from ldm_pipeline.grid import make_grid

__all__ = ["Expected", "Prediction", "Report", "classify", "evaluate", "make_grid", "parse_prompt", "score",
           "score_recolour"]
