"""Generation metadata inside PNG files: AUTOMATIC1111's ``parameters`` text chunk (so A1111, Civitai and friends
read our images) and a JSON chunk with everything needed to regenerate the image bit for bit (``--replay``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

JSON_KEY = "ldm_pipeline"  # PNG tEXt key of our JSON record
A1111_KEY = "parameters"
FORMAT_VERSION = 1


def a1111_parameters(record: dict[str, Any]) -> str:
    """The A1111 ``parameters`` text: prompt line, ``Negative prompt:`` line, then ``Key: value, …``."""
    fields = [
        ("Steps", record["num_inference_steps"]),
        ("Sampler", record.get("sampler_name") or record["scheduler"]),
        ("CFG scale", _num(record["guidance_scale"])),
        ("Seed", record["seed"]),
        ("Size", f"{record['width']}x{record['height']}"),
        ("Model hash", record["model"]["hash"]),
        ("Model", Path(str(record["model"]["name"])).stem if record["model"]["name"] else ""),
    ]
    fields = [(k, v) for k, v in fields if v is not None]  # no hash for a model with no local files to hash
    if record.get("strength") is not None:
        fields.append(("Denoising strength", _num(record["strength"])))
    if record.get("clip_skip", 1) > 1:
        fields.append(("Clip skip", record["clip_skip"]))
    if record.get("eta"):
        fields.append(("Eta DDIM", _num(record["eta"])))  # A1111's key for DDIM's η ("Eta" is its ancestral η)
    if record.get("guidance_rescale"):
        fields.append(("CFG Rescale", _num(record["guidance_rescale"])))
    if record.get("guidance_cutoff"):
        fields.append(("CFG cutoff", _num(record["guidance_cutoff"])))
    if record.get("batch"):
        fields += [("Batch size", record["batch"]["size"]), ("Batch pos", record["batch"]["position"])]
    loras = [x for x in record.get("lora") or [] if x.get("name")]
    if loras and any(x.get("autov3") for x in loras):
        fields.append(("Lora hashes", ", ".join(f"{x['name']}: {x['autov3']}" for x in loras if x.get("autov3"))))
    # A1111 keeps the LoRAs in the prompt as <lora:NAME:WEIGHT> tags; ours come from --lora, so they are added here
    tags = "".join(f" <lora:{x['name']}:{_num(record.get('lora_scale') or 0)}>" for x in loras)
    lines = [record["prompt"] + tags]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields))
    return "\n".join(lines)


def _num(x: float) -> str:
    return f"{float(x):g}"


def _quote(v: Any) -> str:
    s = str(v)
    return json.dumps(s) if ("," in s or ":" in s or "\n" in s) else s


def png_info(record: dict[str, Any]):
    """A PngInfo with both chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(A1111_KEY, a1111_parameters(record))
    info.add_text(JSON_KEY, json.dumps({"format": FORMAT_VERSION, **record}, sort_keys=True, allow_nan=False))
    return info
