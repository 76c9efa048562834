"""The calibration registry: mixtures with weights, named sets, deterministic draws by seed, content hashes
that key variants, and the diversity report."""

from __future__ import annotations

from pathlib import Path

import pytest

from farm.calibration import (
    TextIdentity,
    allocate,
    diversity_of,
    draw,
    mixture_source,
    parts,
    summed_stats,
    token_stats,
)
from farm.errors import SpecError
from farm.plan import ModelInfo, make_plan
from farm.spec import parse_spec


@pytest.fixture
def texts(tmp_path: Path, fixture_paths: dict) -> dict[str, Path]:
    play = (fixture_paths["shakespeare"] / "calibration.txt").read_text()[:200_000]
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text(play[:100_000])
    b.write_text(
        "".join(f'{{"text": "{line}"}}\n' for line in play[100_000:].replace('"', "'").splitlines() if line.strip())
    )
    return {"a": a, "b": b}


def test_allocate_is_proportional_and_exact() -> None:
    assert allocate([1, 1], 5) == [3, 2] and allocate([3, 1], 8) == [6, 2] and sum(allocate([1, 2, 7], 13)) == 13


def test_mixture_draw_is_deterministic_and_weighted(texts: dict, fixture_paths: dict) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fixture_paths["tiny-llama"])
    mix = mixture_source([(str(texts["a"]), 3.0), (str(texts["b"]), 1.0)])
    one, two = draw(mix, tok, 8, 32, 0), draw(mix, tok, 8, 32, 0)
    assert one == two and len(one) == 8 and all(len(w) == 32 for w in one)
    assert draw(mix, tok, 8, 32, 1) != one  # another seed, another draw
    report = diversity_of(mix, *token_stats(one))
    assert report["tokens"] == 256 and 0 < report["unique_token_ratio"] <= 1
    assert [p["weight"] for p in report["parts"]] == [3.0, 1.0] and sum(report["doc_words_histogram"].values()) > 0


def test_rank_shares_are_the_whole_draw_split(texts: dict, fixture_paths: dict) -> None:
    """A data-parallel rank tokenizes only its windows `rank::world` of the whole draw (across a mixture's
    parts), and the ranks' token stats add up to the whole draw's report."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fixture_paths["tiny-llama"])
    mix = mixture_source([(str(texts["a"]), 3.0), (str(texts["b"]), 1.0)])
    whole = draw(mix, tok, 11, 32, 0)
    shares = [draw(mix, tok, 11, 32, 0, rank, 3) for rank in range(3)]
    assert [len(s) for s in shares] == [4, 4, 3] and all(shares[r] == whole[r::3] for r in range(3))
    summed = summed_stats([token_stats(s) for s in shares])
    assert diversity_of(mix, *summed) == diversity_of(mix, *token_stats(whole))


def test_uneven_rank_shares_interleave_over_the_whole_draw(texts: dict, fixture_paths: dict) -> None:
    """With `shares` (stages/distributed/rank_shares.py) rank r gets shares[r] windows, spread over the draw;
    together the ranks hold the whole draw once. A bad split fails before anything is drawn."""
    from transformers import AutoTokenizer

    from farm.calibration import interleave

    assert interleave([2, 2, 2]) == [0, 1, 2, 0, 1, 2]  # equal counts: round robin
    assert interleave([1, 3]) == [1, 1, 0, 1] and interleave([2, 3, 3]).count(0) == 2
    tok = AutoTokenizer.from_pretrained(fixture_paths["tiny-llama"])
    mix = mixture_source([(str(texts["a"]), 3.0), (str(texts["b"]), 1.0)])
    whole = draw(mix, tok, 11, 32, 0)
    ranks = interleave([3, 4, 4])
    shares = [draw(mix, tok, 11, 32, 0, rank, 3, (3, 4, 4)) for rank in range(3)]
    assert [len(s) for s in shares] == [3, 4, 4]
    assert all(shares[r] == [w for w, o in zip(whole, ranks, strict=True) if o == r] for r in range(3))
    with pytest.raises(ValueError, match="summing to 11"):
        draw(mix, tok, 11, 32, 0, 0, 3, (3, 4, 5))


def test_mixture_identity_follows_content_and_weights(texts: dict) -> None:
    a, b = str(texts["a"]), str(texts["b"])
    base = TextIdentity.of(mixture_source([(a, 3.0), (b, 1.0)])).sha256
    assert TextIdentity.of(mixture_source([(a, 3.0), (b, 1.0)])).sha256 == base
    assert TextIdentity.of(mixture_source([(a, 1.0), (b, 1.0)])).sha256 != base
    texts["b"].write_text(texts["b"].read_text() + '{"text": "one more line"}\n')
    assert TextIdentity.of(mixture_source([(a, 3.0), (b, 1.0)])).sha256 != base
    assert parts(a) == [(a, 1.0)]


def _spec(**over: object):
    data = {
        "name": "t",
        "models": [{"source": "/m", "name": "m"}],
        "methods": [
            {"method": "gptq", "group_size": 64},
            {"method": "gptq", "group_size": 64, "name": "g-code", "calibration": {"set": "code"}},
            {"method": "fp8", "calibration": {"set": "code"}},
        ],
        "calibration": {"mixture": [{"source": "/a.txt", "weight": 3}, {"source": "/b.jsonl", "weight": 1}]},
        "calibration_sets": {"code": {"source": "/code.txt", "num_samples": 16}},
        "evaluation": {"perplexity": {"source": "/h.txt"}},
    }
    data.update(over)
    return parse_spec(data)


def test_named_sets_make_different_variants() -> None:
    spec = _spec()
    assert spec.calibration.source.startswith("mix:")
    info = {"m": ModelInfo("sha256:x", {"hidden_size": 128, "intermediate_size": 256}, 1000)}
    plan = make_plan(spec, info, {"": "sha-mix", "code": "sha-code"}, "h")
    by = {v.method.label(): v for v in plan.variants}
    assert by["g-code"].calibration.source == "/code.txt" and by["g-code"].calibration.num_samples == 16
    assert by["g-code"].id != by["gptq-w4a16-g64"].id  # same method, different set
    other = make_plan(spec, info, {"": "sha-mix", "code": "sha-code-v2"}, "h")
    assert {v.method.label(): v.id for v in other.variants}["g-code"] != by["g-code"].id
    assert {v.method.label(): v.id for v in other.variants}["gptq-w4a16-g64"] == by["gptq-w4a16-g64"].id
    assert {v.method.label(): v.id for v in other.variants}["fp8-dynamic"] == by["fp8-dynamic"].id  # data-free


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"calibration": {}}, "`source` or `mixture` is required"),
        ({"calibration": {"source": "/a", "mixture": [{"source": "/b", "weight": 1}]}}, "not both"),
        ({"calibration": {"mixture": [{"source": "/b", "weight": 0}]}}, "weight"),
        ({"calibration_sets": {}}, "unknown set 'code'"),
    ],
)
def test_bad_calibration_specs(over: dict, needle: str) -> None:
    with pytest.raises(SpecError, match=needle):
        _spec(**over)


def test_hf_dataset_source_from_the_hub_cache(tmp_path, monkeypatch) -> None:
    """A dataset downloaded into the hub cache (`hf download --repo-type dataset`) is read offline, its column
    joined; the hash is its content; bad split/column/repo are one line each."""
    import huggingface_hub.constants as c
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from farm.calibration import TextIdentity, read_text
    from farm.errors import SpecError

    commit = "b" * 40
    snap = tmp_path / "hub" / "datasets--farm-test--plays" / "snapshots" / commit / "data"
    snap.mkdir(parents=True)
    pq.write_table(
        pa.table({"body": ["To be, or not to be.", "", "All the world's a stage."]}),
        snap / "train-00000-of-00001.parquet",
    )
    (tmp_path / "hub" / "datasets--farm-test--plays" / "refs").mkdir()
    (tmp_path / "hub" / "datasets--farm-test--plays" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    src = "hf-dataset://farm-test/plays?split=train&column=body"
    assert read_text(src) == "To be, or not to be.\n\nAll the world's a stage."
    assert TextIdentity.of(src).sha256 == TextIdentity.of(src + "&split=train").sha256
    for bad, msg in [
        ("hf-dataset://farm-test/plays?split=test&column=body", "Unknown split"),
        ("hf-dataset://farm-test/plays", "no column 'text'; it has body"),
        ("hf-dataset://farm-test/absent", "not in the local hub cache"),
        ("hf-dataset://plays?colum=body", "unknown option 'colum'"),
    ]:
        with pytest.raises(SpecError, match=msg) as err:
            TextIdentity.of(bad)
        assert "\n" not in str(err.value)


def test_a_draw_from_text_that_changed_since_planning_fails(texts: dict, fixture_paths: dict, tmp_path: Path) -> None:
    """The identity a variant records is that of the text it was calibrated on: the planned hash is checked
    against the bytes the draw read, for a file and for a mixture, and a change fails the draw in one line."""
    from transformers import AutoTokenizer

    from farm.errors import InputChanged

    tok = AutoTokenizer.from_pretrained(fixture_paths["tiny-llama"])
    a = str(texts["a"])
    mix = mixture_source([(a, 1.0), (str(texts["b"]), 1.0)])
    planned = {src: TextIdentity.of(src).sha256 for src in (a, mix)}
    same = draw(a, tok, 4, 32, 0)
    assert draw(a, tok, 4, 32, 0, expect_sha256=planned[a]) == same
    assert draw(mix, tok, 4, 32, 0, expect_sha256=planned[mix]) == draw(mix, tok, 4, 32, 0)
    texts["a"].write_text(texts["a"].read_text()[::-1])  # replaced between planning and building
    for src in (a, mix):
        with pytest.raises(InputChanged, match="changed since the job was planned") as err:
            draw(src, tok, 4, 32, 0, expect_sha256=planned[src])
        assert "\n" not in str(err.value)


def test_a_model_directory_rewritten_after_planning_is_not_published(fixture_paths: dict, tmp_path: Path) -> None:
    import shutil

    from farm.errors import InputChanged
    from farm.runtime.workers import unchanged

    model = tmp_path / "m"
    shutil.copytree(fixture_paths["tiny-llama"], model)
    spec = parse_spec(
        {
            "name": "t",
            "models": [{"source": str(model), "name": "m"}],
            "methods": [{"method": "fp8"}],
            "calibration": {"source": str(fixture_paths["shakespeare"] / "calibration.txt")},
            "evaluation": {"perplexity": {"source": str(fixture_paths["shakespeare"] / "heldout.txt")}},
        }
    )
    from farm import sources

    config = sources.check_checkpoint(model, str(model))
    info = ModelInfo(sources.content_identity(model), config, 1)
    (v,) = make_plan(spec, {"m": info}, "c", "h").variants
    unchanged(v, str(model))  # as planned: passes
    (model / "generation_config.json").write_text('{"do_sample": true}')
    with pytest.raises(InputChanged, match=r"model m: .* changed since the job was planned"):
        unchanged(v, str(model))
