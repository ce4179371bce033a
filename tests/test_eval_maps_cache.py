"""seerlib/eval/maps_cache.py: the evaluation's ground-truth maps cache is safetensors with a header
of what it was computed from, checked on load; a damaged, cut-short, foreign or mismatched file,
and an old pickle, is computed again (never used, never unpickled). On a tiny random Llama."""

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open

import seerlib.eval.quality as quality
from seerlib.distill import tiny_model
from seerlib.eval import dense_pass, evaluate
from seerlib.eval.maps_cache import (
    FORMAT,
    MapsCacheError,
    cached_maps,
    load_maps,
    maps_key,
    maps_path,
    model_key,
    save_maps,
)
from seerlib.gate import GateSet
from seerlib.methods import parse_config

S, B = 96, 32  # 3 blocks a row


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, S), generator=g)  # two windows
    _, _, maps = dense_pass(model, ids[:1], [parse_config("oracle-sum@0.5", block_size=B)],
                            block_size=B)
    return model, ids, maps, model_key(model)


def _saved(tmp_path, tiny):
    _, ids, maps, fields = tiny
    key = maps_key(fields, ids[:1], 0, 0, B)
    path = maps_path(tmp_path, S, 0, 0, B)
    save_maps(path, maps, key)
    return path, key


def test_round_trip_with_its_header(tmp_path, tiny):
    model, _, maps, _ = tiny
    path, key = _saved(tmp_path, tiny)
    assert path.name == f"maps-S{S}-w0-o0-b{B}.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["seerlib"])
    assert meta["format"] == FORMAT and len(meta["sha256"]) == 64
    assert meta["seq_len"] == str(S) and meta["block_size"] == str(B) and meta["layers"] == "2"
    assert meta["dtype"] == "float32" and meta["device"] == "cpu"
    assert len(meta["weights_sha256"]) == 64 and len(meta["tokens_sha256"]) == 64
    got = load_maps(path, key)
    assert set(got) == set(maps) == {0, 1}
    for layer in maps:
        for pool in ("max", "sum"):
            assert torch.equal(got[layer][pool], maps[layer][pool])


def test_a_mismatched_header_is_refused_naming_the_field(tmp_path, tiny):
    _, ids, _, fields = tiny
    path, key = _saved(tmp_path, tiny)
    other_weights = model_key(tiny_model(seed=1))
    cases = {
        "weights_sha256": maps_key(other_weights, ids[:1], 0, 0, B),  # same config, other model
        "tokens_sha256": maps_key(fields, ids[1:], 0, 0, B),  # another window's text
        "block_size": {**key, "block_size": "16"},
        "format": {**key, "format": "seerlib-eval-maps/0"},
        "dtype": {**key, "dtype": "bfloat16"},
    }
    for field, other in cases.items():
        with pytest.raises(MapsCacheError, match=f"computed with {field} "):
            load_maps(path, other)
        lines = []
        assert cached_maps(path, other, log=lines.append) is None
        assert field in lines[0] and "computing the maps again" in lines[0]
    assert load_maps(path, key)  # the file itself is fine


def test_a_soft_capped_models_maps_name_the_cap_in_their_header(tmp_path, tiny):
    """Gemma2's maps are of the soft-capped attention: its header names the cap, so a file
    written without it (before eval carried the cap) is refused; an uncapped model's header
    has no such field, so its files stay valid."""
    from seerlib.tiny import tiny_family

    fields = model_key(tiny_family("gemma2", attn_logit_softcapping=50.0))
    assert fields["softcap"] == "50.0" and "softcap" not in tiny[3]
    _, ids, maps, _ = tiny
    path = maps_path(tmp_path, S, 0, 0, B)
    key = maps_key(fields, ids[:1], 0, 0, B)
    save_maps(path, maps, {k: v for k, v in key.items() if k != "softcap"})
    with pytest.raises(MapsCacheError, match="softcap None.*'50.0'"):
        load_maps(path, key)


def test_a_damaged_file_is_refused(tmp_path, tiny):
    path, key = _saved(tmp_path, tiny)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # a flipped bit in the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(MapsCacheError, match="damaged"):
        load_maps(path, key)
    assert cached_maps(path, key) is None


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, -1])
def test_a_truncated_file_is_refused(tmp_path, tiny, keep):
    path, key = _saved(tmp_path, tiny)
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path.write_bytes(data[:n])
    with pytest.raises(MapsCacheError, match="could not be read"):
        load_maps(path, key)
    assert cached_maps(path, key) is None


def test_incomplete_and_non_finite_maps_are_refused(tmp_path, tiny):
    _, ids, maps, fields = tiny
    key = maps_key(fields, ids[:1], 0, 0, B)
    path = tmp_path / "m.safetensors"
    save_maps(path, {0: maps[0]}, key)  # one of the two layers
    with pytest.raises(MapsCacheError, match="incomplete: it holds 2 of the 4 maps"):
        load_maps(path, key)
    bad = {i: {p: t.clone() for p, t in m.items()} for i, m in maps.items()}
    bad[1]["max"][0, 0, 0, 0] = float("nan")
    save_maps(path, bad, key)
    with pytest.raises(MapsCacheError, match="L1.max holds inf or NaN"):
        load_maps(path, key)


def _pickle_bomb(marker):
    class Bomb:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))  # runs only if someone unpickles it

    return pickle.dumps({0: Bomb()})


def test_a_pickle_is_never_unpickled(tmp_path, tiny):
    path, key = _saved(tmp_path, tiny)
    marker = tmp_path / "unpickled"
    path.write_bytes(_pickle_bomb(marker))  # a pickle under the new name
    with pytest.raises(MapsCacheError, match="could not be read"):
        load_maps(path, key)
    assert not marker.exists()


@pytest.fixture
def run(tiny, monkeypatch):
    """evaluate() of `model` over the two tiny windows (no text cache needed); counts the ground
    truth computations."""
    _, ids, _, _ = tiny
    monkeypatch.setattr(quality, "text_windows",
                        lambda tok, text, split, length, n, offset: ids[:n])
    calls = []
    real = quality.ground_truth
    monkeypatch.setattr(quality, "ground_truth", lambda *a, **k: calls.append(1) or real(*a, **k))
    configs = [parse_config(s, block_size=B) for s in ("dense", "oracle-sum@0.5", "gate@0.5")]

    def go(model, cache):
        calls.clear()
        gates = GateSet.from_config(model.config, block_size=B)  # untrained: enough here
        rows = evaluate(model, None, configs, [S], 2, gates=gates, block_size=B, cache=cache)
        table = [(r["label"], r["ppl"], r["recall"], r["achieved_density"]) for r in rows]
        return table, len(calls)

    return go


def test_evaluate_reuses_a_good_cache_and_rebuilds_a_bad_one(tmp_path, tiny, run, capsys):
    model = tiny[0]
    plain, n_plain = run(model, None)
    assert n_plain == 2 * 2 * 2  # 2 windows x 2 layers x (max, sum)
    first, n_first = run(model, tmp_path)
    assert first == plain and n_first == n_plain
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"maps-S{S}-w{w}-o0-b{B}.safetensors" for w in (0, 1)]
    again, n_again = run(model, tmp_path)
    assert again == plain and n_again == 0  # every map from the cache

    w1 = tmp_path / files[1]
    w1.write_bytes(w1.read_bytes()[:-10])  # cut short
    capsys.readouterr()
    rebuilt, n_rebuilt = run(model, tmp_path)
    assert rebuilt == plain and n_rebuilt == 4  # window 1 only
    assert f"{files[1]} could not be read" in capsys.readouterr().err
    assert load_maps(w1, maps_key(model_key(model), tiny[1][1:], 1, 0, B))  # replaced, valid

    other = tiny_model(seed=1)  # same shapes, other weights: never the first model's maps
    theirs, n_theirs = run(other, None)
    assert theirs != plain
    assert run(other, tmp_path) == (theirs, n_plain)
    assert "computed with weights_sha256" in capsys.readouterr().err


def test_evaluate_ignores_and_replaces_an_old_pickle_cache(tmp_path, tiny, run, capsys):
    marker = tmp_path / "unpickled"
    for w in (0, 1):
        (tmp_path / f"maps-S{S}-w{w}-o0-b{B}.pt").write_bytes(_pickle_bomb(marker))
    plain, n = run(tiny[0], None)
    assert run(tiny[0], tmp_path) == (plain, n)
    assert not marker.exists()
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".safetensors", ".safetensors"]
    assert "an old pickle cache, not read" in capsys.readouterr().err
