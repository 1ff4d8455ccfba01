"""The shapes recipe: the shipped model, trained from scratch the way the LDM paper did it, by our own commands.

Stages (each skipped when its output already exists, so an interrupted recipe continues):
  1. data       ``ldm make-shapes``: img2dataset-layout shards of the synthetic shapes domain
  2. vae        ``ldm train-vae``: AutoencoderKL (factor 4), PSNR on held-out images, latent scaling factor
  3. tokenizer  a CLIP-format BPE vocabulary built from the caption corpus
  4. init       the model folder: random UNet + text encoder sized to the tokenizer, the trained VAE
  5. unet       ``ldm train``: UNet and text encoder jointly, latents cached
  6. eval       ``ldm eval``: prompt adherence (held-in / held-out), DPM++ 2M vs DDIM, img2img recolour
  7. package    the final folder (fp32 safetensors), with a model card, optionally copied into the package
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldm_pipeline.config import flatten, load_yaml, merge, resolve_config_path, save_yaml, to_dict
from ldm_pipeline.errors import UserError

if TYPE_CHECKING:
    from ldm_pipeline.models import ModelSpec


@dataclass
class ShapesRecipe:
    """Everything the recipe needs; the stage configs live in configs/train and are overridden here."""

    output_dir: str = "runs/shapes"
    seed: int = 0
    num_samples: int = 50_000  # training images drawn by make-shapes
    samples_per_shard: int = 1000
    model_config: str = "shapes"  # configs/models architecture
    vae_config: str = "shapes_vae"  # configs/train, stage 1
    vae_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer_vocab_size: int = 600  # byte alphabet (512) + merges for the caption words + BOS/EOS
    tokenizer_max_length: int = 32  # captions are < 20 tokens; a short window keeps cross-attention cheap
    train_config: str = "shapes"  # configs/train, stage 2
    train_overrides: dict[str, Any] = field(default_factory=dict)
    eval_seeds_per_prompt: int = 2
    eval_max_prompts: int | None = None
    eval_recolour: int = 40
    compare_ddim: bool = True  # also evaluate DDIM at 50 steps (the DPM++ 2M vs DDIM check)
    package: bool = False  # copy the final model into ldm_pipeline/assets/models/shapes (the default --model)
    progress: bool = True


# A few steps of every stage: proves the recipe end to end in CI (minutes, not an hour).
TINY_BUDGET: dict[str, Any] = {
    "num_samples": 300,
    "samples_per_shard": 100,
    "vae_overrides": {"max_steps": 4, "batch_size": 8, "eval_every": 0, "num_eval_images": 16, "checkpoint_every": 0,
                      "lr_warmup_steps": 1},
    "train_overrides": {"max_steps": 4, "batch_size": 8, "validate_every": 0, "checkpoint_every": 0,
                        "lr_warmup_steps": 1, "lr_decay_steps": 2, "cache_batch_size": 32},
    "eval_seeds_per_prompt": 1,
    "eval_max_prompts": 2,
    "eval_recolour": 2,
}


def _log(msg: str) -> None:
    print(f"ldm recipe shapes: {msg}", flush=True)


INIT_ARCH_FILE = "architecture.yaml"  # the UNet, text encoder and scheduler the init stage was built from
# run-control keys: they change how a stage runs, not what it produces
_RUN_KEYS = {"resume", "progress_bar", "overwrite", "max_steps"}


def _check_stage_config(stage_dir: Path, saved_name: str, cfg: Any, stage: str) -> bool:
    """An earlier run's stage is only reused or continued when it was trained with the settings the recipe asks
    for now; otherwise a one-line error names the differences (a silently reused stage would be a model trained
    with settings nobody asked for). Returns whether more steps are asked for than were saved (the stage then
    continues from its last checkpoint)."""
    saved_path = stage_dir / saved_name
    if not saved_path.is_file():
        return False
    old, new = flatten(load_yaml(saved_path)), flatten(to_dict(cfg))
    diff = [k for k in sorted(set(old) | set(new)) if k not in _RUN_KEYS and old.get(k) != new.get(k)]
    if int(new.get("max_steps") or 0) < int(old.get("max_steps") or 0):
        diff.append("max_steps")  # more steps continue the stage; fewer would silently keep the longer run
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
        raise UserError(f"{stage_dir} was made with other settings ({shown}); remove it (and the later stages) "
                        f"to run the {stage} stage again, or use another --output-dir")
    return int(new.get("max_steps") or 0) > int(old.get("max_steps") or 0)


def _add_time(out: Path, times: dict[str, float], stage: str, seconds: float, replace: bool = False) -> None:
    """Stage wall times accumulate in OUTPUT_DIR/times.json over every invocation that did work, so a recipe
    run in pieces (interrupted, continued) still reports what its stages cost; `replace` for a stage that is
    redone whole (the evaluation of a changed model), whose earlier runs are not part of the cost."""
    times[stage] = seconds if replace else times.get(stage, 0.0) + seconds
    (out / "times.json").write_text(json.dumps(times, indent=2) + "\n")


@contextlib.contextmanager
def _timed(out: Path, times: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the enclosed stage work to times.json, also when it fails or is interrupted (Ctrl-C):
    a continued run then still reports the work the interrupted invocation spent."""
    t = time.perf_counter()
    try:
        yield
    finally:
        _add_time(out, times, stage, time.perf_counter() - t)


def _load_times(out: Path) -> dict[str, float]:
    path = out / "times.json"
    return {k: float(v) for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def _captions(data_dir: Path) -> list[str]:
    out = []
    for tar in sorted(data_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".txt"):
                    out.append(tf.extractfile(m).read().decode("utf-8"))
    return out


def run_recipe(r: ShapesRecipe) -> dict[str, Any]:
    """Run (or continue) every stage; returns the metrics written to OUTPUT_DIR/recipe.json."""
    out = Path(r.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(r, out / "recipe.yaml")
    times = _load_times(out)
    data = _data_stage(r, out, times)  # 1. data
    vae_out, vae_metrics = _vae_stage(r, out, data, times)  # 2. autoencoder
    tok_dir = _tokenizer_stage(r, out, data, times)  # 3. tokenizer
    spec = _init_spec(r, tok_dir)
    init = _init_stage(r, spec, vae_out, out / "init")  # 4. initial model folder
    final = _unet_stage(r, out, init, data, times)  # 5. diffusion model
    _write_sampling_defaults(final, spec)
    scores = _eval_stage(r, out, final, times)  # 6. evaluation
    return _finish(r, out, final, {"vae": vae_metrics, "scores": scores}, times)  # 7. model card, package


def _data_stage(r: ShapesRecipe, out: Path, times: dict[str, float]) -> Path:
    """The img2dataset-layout shards (``ldm make-shapes``), drawn again unless a complete set is there."""
    data = out / "data"
    if not (data / "done").is_file():
        from ldm_pipeline.shapes.domain import write_shards

        with _timed(out, times, "data"):
            if data.exists():
                shutil.rmtree(data)
            _log(f"drawing {r.num_samples} images")
            write_shards(data, r.num_samples, seed=r.seed, samples_per_shard=r.samples_per_shard)
            (data / "done").write_text("ok\n")
    return data


def _vae_stage(r: ShapesRecipe, out: Path, data: Path, times: dict[str, float]) -> tuple[Path, dict[str, Any]]:
    """The autoencoder (``ldm train-vae``), trained or continued; its output folder and metrics."""
    from ldm_pipeline.training.vae import CONFIG_FILE as VAE_CONFIG_FILE
    from ldm_pipeline.training.vae import effective_config, load_vae_train_config, train_vae

    vae_out = out / "vae"
    layers = {"model": r.model_config, "output_dir": str(vae_out), "seed": r.seed, "data": {"source": str(data)},
              "progress_bar": r.progress}
    vcfg = load_vae_train_config(resolve_config_path(r.vae_config, "train"), merge(layers, r.vae_overrides))
    more_steps = _check_stage_config(vae_out, VAE_CONFIG_FILE, effective_config(vcfg), "autoencoder")
    if more_steps or not (vae_out / "metrics.json").is_file():
        _log("stage 1: autoencoder")
        if vae_out.exists():
            vcfg = dataclasses.replace(vcfg, resume="latest")
        train_vae(vcfg)
    vae_metrics = json.loads((vae_out / "metrics.json").read_text())
    times["vae"] = float(vae_metrics["seconds"])  # train-vae's own record, resumed sessions included
    return vae_out, vae_metrics


def _tokenizer_stage(r: ShapesRecipe, out: Path, data: Path, times: dict[str, float]) -> Path:
    """The CLIP-format BPE vocabulary built from the caption corpus; its folder."""
    from ldm_pipeline.tokenizer import build_clip_tokenizer

    tok_dir = out / "tokenizer"
    if not (tok_dir / "vocab.json").is_file():
        _log("building the tokenizer from the captions")
        with _timed(out, times, "tokenizer"):
            build_clip_tokenizer(_captions(data), tok_dir, vocab_size=r.tokenizer_vocab_size,
                                 model_max_length=r.tokenizer_max_length)
    return tok_dir


def _init_stage(r: ShapesRecipe, spec: ModelSpec, vae_out: Path, init: Path) -> Path:
    """The initial model folder (random UNet + text encoder, the trained VAE), built unless it is there."""
    arch = {"unet": spec.unet, "text_encoder": spec.text_encoder, "scheduler": spec.scheduler}
    _check_stage_config(init, INIT_ARCH_FILE, arch, "initial model")  # an edited configs/models YAML is not reused
    if not (init / "model_index.json").is_file():
        _assemble(spec, r.seed, vae_out / "vae", init)
        save_yaml(arch, init / INIT_ARCH_FILE)
    return init


def _unet_stage(r: ShapesRecipe, out: Path, init: Path, data: Path, times: dict[str, float]) -> Path:
    """The UNet and text encoder (``ldm train``), trained or continued; the final model folder."""
    from ldm_pipeline.training.checkpoints import CONFIG_FILE as TRAIN_CONFIG_FILE
    from ldm_pipeline.training.config import load_train_config
    from ldm_pipeline.training.loop import train

    unet_out = out / "unet"
    final = unet_out / "final"
    layers = {"model": str(init), "output_dir": str(unet_out), "seed": r.seed,
              "data": {"source": str(data), "seed": r.seed}, "progress_bar": r.progress}
    tcfg = load_train_config(resolve_config_path(r.train_config, "train"), merge(layers, r.train_overrides))
    more_steps = _check_stage_config(unet_out, TRAIN_CONFIG_FILE, tcfg, "diffusion")
    if more_steps or not (final / "model_index.json").is_file():
        _log("stage 2: UNet + text encoder")
        if unet_out.exists():
            tcfg = dataclasses.replace(tcfg, resume="latest")
        with _timed(out, times, "unet"):  # an interrupted run's steps (and latent caching) are kept: they count
            train(tcfg)
    return final


def _write_sampling_defaults(final: Path, spec: ModelSpec) -> None:
    """The sampling defaults are settings, not weights: an edited `defaults:` of the model config reaches the
    trained model (and so its evaluation) without training again."""
    from ldm_pipeline.models import write_defaults

    if write_defaults(final, spec.defaults):
        _log(f"sampling defaults of {final}: {dataclasses.asdict(spec.defaults)}")


def _eval_stage(r: ShapesRecipe, out: Path, final: Path, times: dict[str, float]) -> dict[str, Any]:
    """The evaluation scores (``ldm eval``), reused when model and eval settings are unchanged."""
    t = time.perf_counter()
    scores, evaluated = _evaluate(r, final, out / "eval")
    if evaluated:
        _add_time(out, times, "eval", time.perf_counter() - t, replace=True)
    return scores


def _finish(r: ShapesRecipe, out: Path, final: Path, metrics: dict[str, Any],
            times: dict[str, float]) -> dict[str, Any]:
    """The model card, fp32 weights and (optionally) the copy into the package; then OUTPUT_DIR/recipe.json."""
    total = sum(times.values())
    metrics = {**metrics, "seconds": {**times, "total": total}}
    packaged = _package(r, final, out / "model", metrics)
    (out / "recipe.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _log(f"done: {total / 60:.1f} min of work in all stages; model in {packaged}")
    return metrics


def _init_spec(r: ShapesRecipe, tok_dir: Path) -> ModelSpec:
    """The model config with the built tokenizer, which decides the text encoder's vocabulary, special-token ids and
    window; its UNet, text encoder and scheduler are what the init stage is compared on."""
    from ldm_pipeline.models import load_model_spec
    from ldm_pipeline.tokenizer import load_tokenizer

    spec = load_model_spec(r.model_config)
    tok = load_tokenizer(str(tok_dir))
    spec.text_encoder.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, max_position_embeddings=tok.model_max_length)
    spec.tokenizer = str(tok_dir)
    return spec


def _assemble(spec: ModelSpec, seed: int, vae_dir: Path, init: Path) -> None:
    """Random UNet and text encoder of `spec` (see `_init_spec`), plus the trained VAE."""
    from diffusers import AutoencoderKL

    from ldm_pipeline.models import build_components, pipeline_from_components, save_pipeline

    comps = build_components(spec, seed=seed)
    comps["vae"] = AutoencoderKL.from_pretrained(str(vae_dir))
    save_pipeline(pipeline_from_components(comps), init, defaults=spec.defaults, overwrite=True)


def _evaluator_hash() -> str:
    """Hash of the evaluation code and the domain it takes its prompts and position rule from: scores saved by an
    older evaluator are computed again, not reused."""
    import hashlib

    h = hashlib.sha256()
    for name in ("domain.py", "scoring.py", "evaluate.py"):
        h.update(name.encode() + b"\0" + Path(__file__).with_name(name).read_bytes())
    return h.hexdigest()[:16]


def _evaluate(r: ShapesRecipe, model: Path, out: Path) -> tuple[dict[str, Any], bool]:
    """The evaluation's scores, and whether they were computed now (False: reused)."""
    from ldm_pipeline.generator import ImageGenerator as Generator
    from ldm_pipeline.grid import make_grid
    from ldm_pipeline.hashes import folder_hash
    from ldm_pipeline.settings import RuntimeOptions
    from ldm_pipeline.shapes.evaluate import EvalSettings, run_eval

    out.mkdir(parents=True, exist_ok=True)
    key = {"model": folder_hash(model), "evaluator": _evaluator_hash(), "seed": r.seed,
           "seeds_per_prompt": r.eval_seeds_per_prompt, "max_prompts": r.eval_max_prompts,
           "recolour": r.eval_recolour, "compare_ddim": r.compare_ddim}
    if (out / "scores.json").is_file():
        previous = json.loads((out / "scores.json").read_text())
        if previous.get("key") == key:
            return previous, False
    gen = Generator.load(str(model), RuntimeOptions(device="cpu"))
    base = EvalSettings(seeds_per_prompt=r.eval_seeds_per_prompt, seed=r.seed, recolour_prompts=r.eval_recolour,
                        max_prompts_per_set=r.eval_max_prompts)
    scores: dict[str, Any] = {"key": key, "defaults": dataclasses.asdict(gen.defaults)}
    result = run_eval(gen, base, progress=r.progress)
    scores["default"] = result.to_dict()
    (out / "report.md").write_text(result.to_markdown() + "\n")
    cells = {}
    for image, prompt in result.images:
        cells.setdefault(prompt, image)
    make_grid(list(cells.values()), list(cells), cols=10).save(out / "grid.png")
    if r.compare_ddim:
        ddim = dataclasses.replace(base, scheduler="ddim", num_inference_steps=50, recolour_prompts=0,
                                   caption_separation=False)  # the same text encoder: measured once, above
        scores["ddim50"] = run_eval(gen, ddim, progress=r.progress).to_dict()
    (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
    return scores, True


def _package(r: ShapesRecipe, final: Path, model_dir: Path, metrics: dict[str, Any]) -> Path:
    """safetensors copy of the final model with a model card; into the package when `r.package`. fp32, so plain
    ``StableDiffusionPipeline.from_pretrained(folder)`` runs it on a CPU with default arguments (fp16 weights
    there fail with "mat1 and mat2 must have the same dtype")."""
    from ldm_pipeline.models import DEFAULTS_FILE, SHIPPED_MODEL, load_pipeline, save_pipeline

    pipe, info = load_pipeline(str(final))
    save_pipeline(pipe, model_dir, defaults=info.defaults, overwrite=True)
    (model_dir / "README.md").write_text(model_card(r, metrics))
    if (final / DEFAULTS_FILE).is_file():
        shutil.copy(final / DEFAULTS_FILE, model_dir / DEFAULTS_FILE)
    if r.package:
        if SHIPPED_MODEL.exists():
            shutil.rmtree(SHIPPED_MODEL)
        shutil.copytree(model_dir, SHIPPED_MODEL)
        return SHIPPED_MODEL
    return model_dir


# the shipped model's targets, shown beside the measured scores in the model card
TARGETS = {"held_in": 0.90, "held_out": 0.75, "position": 0.80, "recolour": 0.80, "psnr": 30.0, "ddim_gap": 0.03}


def model_card(r: ShapesRecipe, metrics: dict[str, Any]) -> str:
    """The model folder's README.md: what the model is, how it was made and how well it follows prompts."""
    s = metrics["scores"]
    d = s["default"]["txt2img"]
    attr = d["attribute_accuracy"]
    rec = s["default"].get("img2img_recolour") or {}
    defaults = s["defaults"]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f} %"  # noqa: E731
    times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in metrics["seconds"].items() if k != "total")
    lines = [
        "# ldm_pipeline shapes model",
        "",
        "A small latent diffusion model trained from scratch by `ldm recipe shapes`, the way the LDM paper trains:",
        "stage 1 an autoencoder (diffusers AutoencoderKL, factor 4: 64x64 RGB <-> 16x16x4 latents), stage 2 a",
        "CLIP-style text encoder and a UNet (cross-attention at 8x8 and 4x4, plus the attention-pooled caption",
        "added to the time embedding of every ResNet block; v-prediction, zero terminal SNR) trained jointly",
        "on the synthetic shapes dataset: one circle, square or triangle of one of 8 colours on a",
        "plain background of another colour, with LAION-style captions, read from img2dataset-layout shards.",
        "Green triangles, purple circles, orange squares and white circles were never drawn in training.",
        "",
        "```bash",
        'ldm txt2img "a red circle on a blue background, on the left"      # this model is the default --model',
        "```",
        "",
        f"Sampling defaults (used when no flag says otherwise): {defaults['scheduler']}, "
        f"{defaults['num_inference_steps']} steps, CFG {defaults['guidance_scale']}"
        + (f" at timesteps >= {defaults['guidance_cutoff']:g} of the schedule (the less noisy steps run the prompt "
           "alone, `--guidance-cutoff`)" if defaults.get("guidance_cutoff") else "")
        + f", {defaults['width']}x{defaults['height']}.",
        "",
        "## How it was made",
        "",
        f"`ldm recipe shapes --seed {r.seed}`: {r.num_samples} images; configs `configs/models/{r.model_config}.yaml`,"
        f" `configs/train/{r.vae_config}.yaml`, `configs/train/{r.train_config}.yaml`"
        f" (overrides: {r.vae_overrides or 'none'}, {r.train_overrides or 'none'}).",
        f"Time: {metrics['seconds']['total'] / 60:.1f} min of work in all ({times}; `unet` includes caching the"
        " latents), on the machine that ran the recipe.",
        "",
        "## Scores (`ldm eval` at the defaults above)",
        "",
        "| measure | score | target |",
        "|---|---|---|",
        f"| background + colour + shape right, held-in prompts ({d['num_held_in']} images) | "
        f"{pct(d['held_in_accuracy'])} | >= {pct(TARGETS['held_in'])} |",
        f"| background + colour + shape right, held-out prompts ({d['num_held_out']} images) | "
        f"{pct(d['held_out_accuracy'])} | >= {pct(TARGETS['held_out'])} |",
        f"| position right, prompts naming one ({d['num_with_position']} images) | {pct(d['position_accuracy'])} | "
        f">= {pct(TARGETS['position'])} |",
        f"| img2img recolour right (strength {rec.get('strength', 'n/a')}, {rec.get('count', 0)} edits) | "
        f"{pct(rec.get('all'))} | >= {pct(TARGETS['recolour'])} |",
        f"| VAE reconstruction PSNR, held-out images | {metrics['vae']['psnr']:.2f} dB | >= {TARGETS['psnr']:.0f} dB |",
    ]
    if "ddim50" in s:
        lines.append(f"| held-in, DDIM 50 steps | {pct(s['ddim50']['txt2img']['held_in_accuracy'])} | "
                     f"within {100 * TARGETS['ddim_gap']:.0f} points of the default sampler |")
    lines += [
        "",
        "Per attribute: " + ", ".join(f"{k} {pct(v)}" for k, v in attr.items()) + ".",
        "",
        "Text encoder, relative distance between captions that differ in one attribute (`ldm eval`'s caption",
        "separation; near 0 means the model cannot tell those words apart): "
        + ", ".join(f"{k} {v:.3f}" for k, v in s["default"].get("caption_separation", {}).items()) + ".",
        "",
        "## Limits",
        "",
        "It knows only this domain: 64x64 images, the 8 colours, 3 shapes and 5 positions of the captions it was",
        "trained on. Words outside the recipe's tokenizer vocabulary are split into bytes it has rarely seen.",
        "`ldm export --single-file` refuses it: the CompVis single-file layout has no place for the UNet's",
        "pooled-caption embedding (`add_embedding`); share the diffusers folder instead.",
        "",
    ]
    return "\n".join(lines)
