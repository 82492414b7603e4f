"""The playground without a browser: settings and their hooks against the library's own calls, the
per-token shading against generation's scores, the model worker's queue and hook-leak check, uploads,
and `steerlab serve`'s options."""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext

import pytest
import torch

from steerlab.cli import main
from steerlab.data import encode, load_builtin
from steerlab.errors import UserError
from steerlab.hooks import Positions, ablate
from steerlab.playground.core import Playground
from steerlab.playground.settings import SettingError, parse_setting
from steerlab.playground.streaming import Cancelled, stream_generation, token_logprobs
from steerlab.playground.worker import HookLeakError, ModelWorker, hook_count
from steerlab.steering import extract_mean_difference


@pytest.fixture
def vectors(tiny_lm):
    pairs = load_builtin("sentiment")[:8]
    v = extract_mean_difference(tiny_lm, pairs, layers=[1, 2], progress=False)
    return {"v": v, "w": v.random_like(seed=1)}


def parse(tiny_lm, vectors, **data):
    return parse_setting(
        data, lambda key, option: vectors[key] if key in vectors else _missing(key, option), tiny_lm
    )


def _missing(key, option):
    raise SettingError(f"{option}: no vector {key!r}")


def logits(lm, context=None):
    ids = torch.tensor([encode(lm.tokenizer, "The weather was")])
    with torch.no_grad(), context or nullcontext():
        return lm.model(input_ids=ids).logits


@pytest.mark.parametrize(
    "data, message",
    [
        ({"vector": "v", "layer": 2}, "exactly one of fraction"),
        ({"vector": "v", "layer": 2, "fraction": 0.1, "multiplier": 1}, "exactly one of fraction"),
        ({"vector": "nope", "layer": 2, "fraction": 0.1}, "vector: no vector 'nope'"),
        ({"vector": "v", "layer": 3, "fraction": 0.1}, "not stored"),
        ({"vector": "v", "fraction": 0.1}, "layer: the vector has layers [1, 2]"),
        ({"vector": "v", "layer": 1.5, "fraction": 0.1}, "layer: expected a whole number"),
        ({"vector": "v", "layer": 2, "fraction": "inf"}, "fraction: 'inf' is not a finite number"),
        ({"vector": "v", "layer": 2, "fraction": 0.1, "positions": "middle"}, "--positions 'middle'"),
        ({"vector": "v", "layer": 2, "fraction": 0.1, "op": "multiply"}, "op: 'multiply'"),
        ({"vector": "v", "layer": 2, "fraction": 0.1, "op": "add"}, "second: no vector ''"),
    ],
)
def test_settings_are_validated_field_by_field(tiny_lm, vectors, data, message):
    with pytest.raises(UserError) as error:
        parse(tiny_lm, vectors, **data)
    assert message in str(error.value)


def test_setting_hooks_equal_the_library_calls(tiny_lm, vectors):
    v, w = vectors["v"], vectors["w"]
    m = v.multiplier_for_fraction(2, 0.3)
    cases = [
        (dict(op="none"), lambda: v.apply(tiny_lm, layer=2, multiplier=m)),
        (dict(op="add", second="w"), lambda: (v + w).apply(tiny_lm, layer=2, multiplier=m)),
        (dict(op="subtract", second="w"), lambda: (v - w).apply(tiny_lm, layer=2, multiplier=m)),
        (
            dict(op="orthogonalise", second="w"),
            lambda: v.orthogonalised(w).apply(tiny_lm, layer=2, multiplier=m),
        ),
    ]
    for extra, library in cases:
        setting = parse(tiny_lm, vectors, vector="v", layer=2, multiplier=m, **extra)
        torch.testing.assert_close(
            logits(tiny_lm, setting.intervention(tiny_lm)), logits(tiny_lm, library()), rtol=0, atol=0
        )
    # A fraction is resolved on the combined vector, as `multiplier_for_fraction` would.
    setting = parse(tiny_lm, vectors, vector="v", layer=2, fraction=0.3, op="add", second="w")
    assert setting.multiplier == (v + w).multiplier_for_fraction(2, 0.3)

    setting = parse(tiny_lm, vectors, vector="v", layer=2, multiplier=m, op="ablate", second="w")
    with v.apply(tiny_lm, layer=2, multiplier=m), ablate(tiny_lm, w.vectors[2]):
        expected = logits(tiny_lm)
    torch.testing.assert_close(logits(tiny_lm, setting.intervention(tiny_lm)), expected, rtol=0, atol=0)
    assert not torch.equal(expected, logits(tiny_lm, v.apply(tiny_lm, layer=2, multiplier=m)))
    assert hook_count(tiny_lm.model) == 0


@pytest.mark.parametrize("spec", ["all", "decode", "from:-2", "at:1,3,17"])
def test_shading_logprobs_equal_generation_scores(tiny_lm, vectors, spec):
    """token_logprobs replays prompt + continuation as generation ran them: under every position spec the
    log-probabilities equal those of the scores `generate` chose the tokens from."""
    v = vectors["v"]
    ids = torch.tensor([encode(tiny_lm.tokenizer, "The weather was")])
    with v.apply(
        tiny_lm, layer=2, multiplier=v.multiplier_for_fraction(2, 0.8), positions=Positions.parse(spec)
    ):
        out = tiny_lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=10,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[0, ids.shape[1] :].tolist()
        replayed = token_logprobs(tiny_lm, ids[0].tolist(), tokens)
    expected = [float(s[0].double().log_softmax(-1)[t]) for s, t in zip(out.scores, tokens)]
    assert replayed == pytest.approx(expected, abs=1e-6)  # generate keeps its scores in float32


def test_streamed_tokens_are_the_library_generation(tiny_lm, vectors):
    from steerlab.evaluate import generate

    v = vectors["v"]
    seen = []
    result = stream_generation(
        tiny_lm,
        "Hello",
        v.apply(tiny_lm, layer=1, multiplier=40.0),
        max_new_tokens=9,
        chat=True,
        on_token=lambda token, piece: seen.append((token, piece)),
    )
    with v.apply(tiny_lm, layer=1, multiplier=40.0):
        (expected,) = generate(tiny_lm, ["Hello"], max_new_tokens=9, chat=True)
    assert result.text == expected
    assert [t for t, _ in seen] == result.ids and len(result.ids) == 9
    assert "".join(p for _, p in seen).strip() == expected
    assert result.prompt_ids == encode(
        tiny_lm.tokenizer,
        tiny_lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
        ),
    )


def test_cancelled_generation_removes_its_hooks(tiny_lm, vectors):
    playground = Playground(tiny_lm)
    try:
        key = playground._register("v", vectors["v"], "test").id
        request = playground.generation_request(
            {"setting": {"vector": key, "layer": 2, "fraction": 0.5}, "prompt": "Hi", "chat": False}
        )
        events = []
        stop = threading.Event()

        def emit(event):
            events.append(event)
            if event.get("side") == "steered" and "token" in event:
                stop.set()

        future = playground.worker.submit(playground.run_generation, request, emit, stop.is_set)
        with pytest.raises(Cancelled):
            future.result(timeout=60)
        assert [e["side"] for e in events if e.get("done")] == ["unsteered"]
        assert hook_count(tiny_lm.model) == 0
        assert playground.worker.submit(lambda: 7).result(timeout=60) == 7  # the worker goes on
    finally:
        playground.close()


def test_worker_runs_jobs_in_order_and_stops_after_a_hook_leak(tiny_lm):
    worker = ModelWorker(tiny_lm.model)
    try:
        order = []
        futures = [worker.submit(order.append, i) for i in range(20)]
        for future in futures:
            future.result(timeout=60)
        assert order == list(range(20))
        leak = worker.submit(lambda: tiny_lm.model.register_forward_hook(lambda *a: None))
        with pytest.raises(HookLeakError, match="left 1 hooks"):  # the leaking request fails itself
            leak.result(timeout=60)
        with pytest.raises(HookLeakError, match="left 1 hooks"):  # and so does every later one
            worker.submit(lambda: 1).result(timeout=60)
    finally:
        worker.close()


def test_uploads_are_parsed_by_the_validated_loaders(tiny_lm, tmp_path):
    import pickle

    playground = Playground(tiny_lm)
    try:
        with pytest.raises(SettingError, match="should end in .json, .jsonl, .txt"):
            playground.extract(
                {"source": "upload", "upload": {"filename": "x.pkl", "content": ""}, "layers": "1"}
            )
        payload = pickle.dumps({"positive": ["a"], "negative": ["b"]}, protocol=0).decode("latin-1")
        future = playground.extract(
            {"source": "upload", "upload": {"filename": "pairs.json", "content": payload}, "layers": "1"}
        )
        with pytest.raises(UserError, match="^pairs.json: "):
            future.result(timeout=60)
        good = '{"positive": ["I am glad.", "What a day!"], "negative": ["I am sad.", "What a mess."]}'
        entry = playground.extract(
            {"source": "upload", "upload": {"filename": "pairs.json", "content": good}, "layers": "1,2"}
        ).result(timeout=60)
        assert entry.name == "pairs-mean-diff" and entry.vector.layers == [1, 2]
        with pytest.raises(SettingError, match="source: 'caa:sycophancy'"):
            playground.extract({"source": "caa:sycophancy", "layers": "1"})
    finally:
        playground.close()


def test_results_paths_stay_inside_the_results_folder(tiny_lm, tmp_path):
    (tmp_path / "results" / "run").mkdir(parents=True)
    (tmp_path / "results" / "run" / "report.html").write_text("<p>ok</p>")
    (tmp_path / "secret.txt").write_text("secret")
    (tmp_path / "results" / "run" / "link.csv").symlink_to(tmp_path / "secret.txt")
    playground = Playground(tiny_lm, results_dir=tmp_path / "results")
    try:
        assert playground.result_path("run/report.html").read_text() == "<p>ok</p>"
        for bad in ("../secret.txt", "run/../../secret.txt", str(tmp_path / "secret.txt"), "run/link.csv"):
            with pytest.raises(SettingError, match="no file"):
                playground.result_path(bad)
        assert playground.list_results() == [{"folder": "run", "files": ["run/report.html"]}]
    finally:
        playground.close()


def test_serve_options_and_the_warning_for_other_hosts(tiny_lm, tmp_path, monkeypatch, capsys, caplog):
    from steerlab.playground import commands, server

    assert main(["serve", "--vectors", str(tmp_path / "missing")]) == 2
    assert "--vectors:" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 2
    assert server.is_local("127.0.0.1") and server.is_local("::1") and server.is_local("localhost")
    assert not server.is_local("0.0.0.0") and not server.is_local("192.168.1.4")
    assert server.allowed_hosts("127.0.0.1") != ["*"] and server.allowed_hosts("0.0.0.0") == ["*"]

    served = []
    monkeypatch.setattr(server, "serve", lambda playground, host, port: served.append((host, port)))
    with caplog.at_level(logging.WARNING, logger="steerlab.playground"):
        commands.serve(commands.ServeArgs(host="0.0.0.0", port=9999), lm=tiny_lm)
    assert served == [("0.0.0.0", 9999)]
    assert "reachable from other machines" in caplog.text
    assert "http://0.0.0.0:9999/" in capsys.readouterr().out


def test_metrics_equal_the_library_comparison(tiny_lm, vectors):
    from steerlab.evaluate import prepare_neutral
    from steerlab.steering.metrics import behaviour_metric, compare

    playground = Playground(tiny_lm)
    try:
        key = playground._register("v", vectors["v"], "test").id
        setting, data, limit = playground.metrics_request(
            {
                "setting": {"vector": key, "layer": 2, "fraction": 0.5},
                "data": "builtin:sentiment-ab",
                "limit": 3,
            }
        )
        got = playground.worker.submit(playground.run_metrics, setting, data, limit).result(timeout=120)
    finally:
        playground.close()
    v = vectors["v"]
    metric = behaviour_metric(tiny_lm, load_builtin("sentiment-ab")[:3])
    neutral = prepare_neutral(tiny_lm, load_builtin("neutral-text"))
    expected = compare(
        tiny_lm, v, metric, 2, v.multiplier_for_fraction(2, 0.5), neutral=neutral, progress=False
    )
    assert got["unsteered"] == expected["unsteered"]
    assert got["steered"] == expected["+m"]
    assert got["multiplier"] == v.multiplier_for_fraction(2, 0.5) and got["fraction"] == pytest.approx(0.5)
