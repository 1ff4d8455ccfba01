"""The shapes demo: a synthetic domain small enough to train a text-to-image model from scratch on a CPU and to
measure its prompt adherence exactly. It is built on the toolkit and is not part of it: the toolkit never imports
it (only `ldm`'s command table names its three commands, and models.py the shipped model's folder).

  domain.py           the domain: colours, shapes, positions, rendering, captions, `write_shards` (img2dataset layout)
  scoring.py          prompt adherence read from pixels, no model: `classify`, `parse_prompt`, `score`, `evaluate`
  evaluate.py         run a model on the fixed prompt set and score it (txt2img, img2img recolour): `run_eval`
  recipe.py           the shipped model, every stage from data to model card: `run_recipe`
  cli_make_shapes.py  ``ldm make-shapes``
  cli_eval.py         ``ldm eval``
  cli_recipe.py       ``ldm recipe shapes``

Its configs are with the others: configs/models/shapes.yaml, configs/train/shapes.yaml, configs/train/shapes_vae.yaml.
This file imports nothing, so ``ldm --help`` and the commands' ``--help`` stay fast.
"""
