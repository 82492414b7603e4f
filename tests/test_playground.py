"""The playground driven in headless Chromium (Playwright) against a tiny random model: the page's
generations equal `steerlab.evaluate.generate` token for token, sweeps equal `steering.sweep.sweep`,
concurrent clients get what they would get alone, and injected markup stays text."""

from __future__ import annotations

import json
import shutil
import urllib.request
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from steerlab.data import encode, load_builtin
from steerlab.evaluate import generate, prepare_neutral
from steerlab.hooks import Positions, ablate
from steerlab.models import wrap
from steerlab.playground.worker import hook_count
from steerlab.steering import extract_mean_difference
from steerlab.steering.metrics import behaviour_metric
from steerlab.steering.sweep import Grid, rows_to_csv, sweep

pytest.importorskip("starlette", reason="the playground needs the serve extra (pip install steerlab[serve])")
pytest.importorskip("uvicorn", reason="the playground needs the serve extra (pip install steerlab[serve])")

PAYLOAD = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
FILE_PAYLOAD = "<img src=x onerror=window.__pwned=3>"  # no slash: a valid file name
PROMPT = "The weather was"


def _launch(playwright):
    """Chromium: the system one (Debian's /usr/bin/chromium) or Playwright's own download."""
    errors = []
    system = shutil.which("chromium") or shutil.which("chromium-browser")
    attempts = [dict(executable_path=system, args=["--no-sandbox"])] if system else []
    attempts.append(dict(args=["--no-sandbox"]))
    for options in attempts:
        try:
            return playwright.chromium.launch(headless=True, **options)
        except Exception as error:  # noqa: BLE001 - every failure is reported in the skip reason
            errors.append(
                f"{options.get('executable_path', 'playwright chromium')}: {str(error).splitlines()[0]}"
            )
    pytest.skip("no browser can be launched (make setup installs Debian's chromium): " + "; ".join(errors))


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (the dev extra)"
    )
    playwright = sync_api.sync_playwright().start()
    try:
        browser = _launch(playwright)
        yield browser
        browser.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A tiny model, two saved vectors, a results folder, and the playground serving them."""
    from steerlab.playground import Playground, running

    torch.manual_seed(0)
    lm = wrap(tiny_model("llama"), char_tokenizer(), name="tiny-llama")
    root = tmp_path_factory.mktemp("playground")
    vectors = root / "vectors"
    pairs = load_builtin("sentiment")[:8]
    sentiment = extract_mean_difference(lm, pairs, layers=[1, 2], progress=False)
    sentiment.save(vectors / "sentiment")
    other = sentiment.random_like(seed=1)
    other.save(vectors / "other")
    hostile = sentiment.random_like(seed=2)
    hostile.metadata["source"] = PAYLOAD
    hostile.save(vectors / FILE_PAYLOAD)
    (vectors / "broken.safetensors").write_bytes(b"not a safetensors file")
    (vectors / "broken.json").write_text("{}")
    results = root / "results"
    run = results / "run-1"
    run.mkdir(parents=True)
    (run / "report.html").write_text(
        f"<html><body><h1>report</h1>{PAYLOAD}<script>parent.__pwned=4</script></body></html>"
    )
    (run / "sweep.csv").write_text(f"layer,score\n1,0.5\n2,{PAYLOAD.replace(',', ' ')}\n")
    (run / f"{FILE_PAYLOAD}.json").write_text(json.dumps({"note": PAYLOAD}))
    playground = Playground(lm, vectors_dir=vectors, results_dir=results)
    ids = {entry.name: entry.id for entry in playground.vectors.values()}
    with running(playground) as url:
        yield {"lm": lm, "url": url, "pg": playground, "ids": ids, "sentiment": sentiment, "other": other}
    playground.close()


@pytest.fixture
def page(browser, lab):
    context = browser.new_context()
    page = context.new_page()
    page.goto(lab["url"])
    page.wait_for_selector("body[data-ready=true]")
    yield page
    assert page.evaluate("window.__pwned") is None
    context.close()


def library_generation(lm, vector, layer, multiplier, positions="all", max_new_tokens=12, then=nullcontext):
    """(text, token ids) of the library's own greedy generation under `vector.apply` (and then the hooks of
    `then()`), without the server."""
    with vector.apply(lm, layer=layer, multiplier=multiplier, positions=Positions.parse(positions)), then():
        (text,) = generate(lm, [PROMPT], chat=False, max_new_tokens=max_new_tokens)
        ids = torch.tensor([encode(lm.tokenizer, PROMPT)])
        out = lm.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
        )
    return text, out[0, ids.shape[1] :].tolist()


def set_up_generation(page, vector_id, layer, *, fraction=None, multiplier=None, max_new_tokens=12):
    page.select_option("#vector", vector_id)
    page.select_option("#layer", str(layer))
    if fraction is not None:
        page.fill("#fraction", str(fraction))  # moves the slider: fires its input event
    else:
        page.fill("#multiplier", str(multiplier))
    page.fill("#prompt", PROMPT)
    page.set_checked("#chat", False)
    page.fill("#max-tokens", str(max_new_tokens))


def read_side(page, side):
    spans = page.locator(f"#out-{side} .tok")
    ids = [int(t) for t in spans.evaluate_all("els => els.map(e => e.dataset.token)")]
    deltas = spans.evaluate_all("els => els.map(e => Number(e.dataset.delta))")
    return page.get_attribute(f"#out-{side}", "data-text"), ids, deltas


def test_generate_side_by_side_matches_library(page, lab):
    lm, vector = lab["lm"], lab["sentiment"]
    set_up_generation(page, lab["ids"]["sentiment"], 2, fraction=0.5)
    multiplier = vector.multiplier_for_fraction(2, 0.5)
    assert float(page.input_value("#multiplier")) == pytest.approx(multiplier, rel=1e-3)
    assert page.text_content("#fraction-value") == "0.50"
    page.click("#generate")
    page.wait_for_selector("body[data-generation=done]")
    assert not page.is_visible("#error")

    plain_text, plain_ids, plain_deltas = read_side(page, "unsteered")
    steered_text, steered_ids, steered_deltas = read_side(page, "steered")
    expected_text, expected_ids = library_generation(lm, vector, 2, multiplier)
    assert (steered_text, steered_ids) == (expected_text, expected_ids)
    (unsteered,) = generate(lm, [PROMPT], chat=False, max_new_tokens=12)
    assert plain_text == unsteered
    assert steered_text != plain_text
    assert "".join(page.locator("#out-steered .tok").all_text_contents()).strip() == steered_text

    # Shading of the first steered token: log p under steering minus without, from plain forward passes.
    ids = torch.tensor([encode(lm.tokenizer, PROMPT)])
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits[0, -1].log_softmax(-1)[steered_ids[0]]
        with vector.apply(lm, layer=2, multiplier=multiplier):
            steered = lm.model(input_ids=ids).logits[0, -1].log_softmax(-1)[steered_ids[0]]
    assert steered_deltas[0] == pytest.approx(float(steered - base), abs=1e-4)
    assert len(plain_deltas) == len(plain_ids) and len(steered_deltas) == len(steered_ids)

    # A raw multiplier typed in instead of the slider; positions from the last prompt token on.
    page.fill("#multiplier", "-20")
    page.fill("#positions", "from:-1")
    page.click("#generate")
    page.wait_for_selector("body[data-generation=done]")
    text, ids_, _ = read_side(page, "steered")
    assert (text, ids_) == library_generation(lm, vector, 2, -20.0, positions="from:-1")

    # Vector arithmetic (v - w at a fraction of the residual norm), then ablation of w while steering with v.
    other = lab["other"]
    page.fill("#positions", "all")
    page.select_option("#op", "subtract")
    page.select_option("#second", lab["ids"]["other"])
    page.fill("#fraction", "0.7")
    page.click("#generate")
    page.wait_for_selector("body[data-generation=done]")
    difference = vector - other
    expected = library_generation(lm, difference, 2, difference.multiplier_for_fraction(2, 0.7))
    assert read_side(page, "steered")[:2] == expected
    page.select_option("#op", "ablate")
    page.fill("#multiplier", "30")
    page.click("#generate")
    page.wait_for_selector("body[data-generation=done]")
    expected = library_generation(lm, vector, 2, 30.0, then=lambda: ablate(lm, other.vectors[2]))
    assert read_side(page, "steered")[:2] == expected


def test_sweep_tab_shows_plots_and_matches_library(page, lab):
    lm, vector = lab["lm"], lab["sentiment"]
    page.click("[data-tab=sweep]")
    page.select_option("#sweep-vector", lab["ids"]["sentiment"])
    page.fill("#sweep-layers", "1,2")
    page.fill("#sweep-strengths", "-0.5,0.5")
    page.select_option("#sweep-data", "builtin:sentiment-ab")
    page.fill("#sweep-limit", "2")
    page.click("#sweep-run")
    page.wait_for_selector("body[data-sweep=done]", timeout=30_000)
    for image in ("#sweep-curves", "#sweep-heatmap"):
        page.wait_for_function(f"document.querySelector('{image}').naturalWidth > 100")
    assert (
        page.locator("#sweep-table tr").count() == 1 + 2 + 2 * 2 * 2
    )  # header, baselines, 2x2 x (vector, random)
    assert page.evaluate("document.querySelector('#sweep-progress').value") == 2 * (1 + 2 * 2)

    with page.expect_download() as download:
        page.click("#sweep-csv")
    served = Path(download.value.path()).read_text()
    dataset = load_builtin("sentiment-ab")[:2]
    neutral = prepare_neutral(lm, load_builtin("neutral-text"))
    rows = sweep(
        lm,
        vector,
        behaviour_metric(lm, dataset),
        Grid([1, 2], fractions=[-0.5, 0.5]),
        neutral=neutral,
        progress=False,
    )
    assert served == rows_to_csv(rows)


def test_concurrent_clients_get_what_they_would_alone(browser, lab):
    lm = lab["lm"]
    pages = []
    for _ in range(2):
        context = browser.new_context()
        page = context.new_page()
        page.goto(lab["url"])
        page.wait_for_selector("body[data-ready=true]")
        pages.append(page)
    first, second = pages
    set_up_generation(first, lab["ids"]["sentiment"], 2, fraction=0.6, max_new_tokens=16)
    set_up_generation(second, lab["ids"]["other"], 1, multiplier=-300, max_new_tokens=16)
    first.click("#generate")
    second.click("#generate")
    for page in pages:
        page.wait_for_selector("body[data-generation=done]")
    got_first = read_side(first, "steered")[:2]
    got_second = read_side(second, "steered")[:2]
    sentiment, other = lab["sentiment"], lab["other"]
    assert got_first == library_generation(
        lm, sentiment, 2, sentiment.multiplier_for_fraction(2, 0.6), max_new_tokens=16
    )
    assert got_second == library_generation(lm, other, 1, -300.0, max_new_tokens=16)
    assert got_first != got_second
    assert hook_count(lm.model) == lab["pg"].worker.baseline_hooks
    for page in pages:
        assert page.evaluate("window.__pwned") is None
        page.context.close()


def test_injected_markup_is_rendered_inert(browser, lab, tmp_path):
    """Markup typed into every text field, carried by file names, vector metadata, uploads and result
    files, shows as text. The page's Content-Security-Policy is bypassed here, so that escaping alone
    (not the policy that would block inline scripts anyway) is what keeps the markup inert."""
    context = browser.new_context(bypass_csp=True)
    page = context.new_page()
    page.goto(lab["url"])
    page.wait_for_selector("body[data-ready=true]")

    def error_text():
        page.wait_for_selector("#error:not([hidden])")
        text = page.text_content("#error")
        page.evaluate(
            "() => { const box = document.getElementById('error'); box.hidden = true; box.textContent = ''; }"
        )
        return text

    # A vector whose file name and metadata carry markup, listed and chosen like any other.
    page.select_option("#vector", lab["ids"][FILE_PAYLOAD])
    assert FILE_PAYLOAD in page.text_content("#vector")
    assert PAYLOAD in page.text_content("#vector-info")
    assert "broken" in page.text_content("#unusable")

    # Every text field of the generation form.
    page.fill("#prompt", PAYLOAD)
    page.fill("#system", PAYLOAD)
    page.click("#generate")
    page.wait_for_selector("body[data-generation=error]")
    assert "system_prompt" in error_text()
    page.fill("#system", "")
    page.fill("#positions", PAYLOAD)
    page.click("#generate")
    page.wait_for_selector("body[data-generation=error]")
    assert PAYLOAD in error_text()
    page.fill("#positions", "all")
    page.fill("#multiplier", "1")
    page.fill("#max-tokens", "4")
    page.click("#generate")
    page.wait_for_selector("body[data-generation=done]")

    # Extraction: layers, name, and an uploaded file whose name and content carry markup.
    page.click("#extract-box summary")
    page.fill("#extract-layers", PAYLOAD)
    page.click("#extract")
    assert PAYLOAD in error_text()
    upload = tmp_path / f"{FILE_PAYLOAD}.json"
    upload.write_text(json.dumps({"positive": [PAYLOAD], "negative": [7]}))
    page.select_option("#extract-source", "upload")
    page.set_input_files("#extract-file", str(upload))
    page.fill("#extract-layers", "1")
    page.click("#extract")
    message = error_text()
    assert FILE_PAYLOAD in message and "negative[0]" in message
    page.select_option("#extract-source", "builtin:sentiment")
    page.fill("#extract-name", PAYLOAD)
    page.click("#extract")
    page.wait_for_function("document.querySelector('#extract-status').textContent.startsWith('extracted')")
    assert PAYLOAD in page.text_content("#vector")

    # Sweep fields.
    page.click("[data-tab=sweep]")
    page.fill("#sweep-strengths", PAYLOAD)
    page.click("#sweep-run")
    assert PAYLOAD in error_text()
    page.fill("#sweep-strengths", "0.5")
    page.fill("#sweep-layers", PAYLOAD)
    page.click("#sweep-run")
    assert PAYLOAD in error_text()

    # Results: a report with a script (served in a sandbox), a table and a file named with markup.
    page.click("[data-tab=results]")
    page.click("a[data-path='run-1/sweep.csv']")
    page.wait_for_selector("#result-table:not([hidden])")
    assert PAYLOAD.replace(",", " ") in page.text_content("#result-table")
    page.locator("#runs a", has_text=FILE_PAYLOAD).click()
    page.wait_for_selector("#result-text:not([hidden])")
    assert json.loads(page.text_content("#result-text"))["note"] == PAYLOAD
    page.click("a[data-path='run-1/report.html']")
    frame = page.wait_for_selector("#result-frame:not([hidden])").content_frame()
    frame.wait_for_selector("h1")
    assert frame.evaluate("document.body.textContent").startswith("report")

    assert page.evaluate("document.querySelectorAll('img[src=x], script:not([src])').length") == 0
    assert frame.evaluate("document.querySelectorAll('img[src=x]').length") == 1  # the report's own markup
    assert page.evaluate("window.__pwned") is None
    context.close()


def test_server_refuses_other_hosts_and_paths_outside_results(lab):
    url = lab["url"]
    request = urllib.request.Request(url + "api/state", headers={"Host": "attacker.example"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request)
    assert error.value.code == 400
    for path in (
        "results/../vectors/sentiment.json",
        "results/%2e%2e/vectors/sentiment.json",
        "results//etc/passwd",
    ):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(url + path)
        assert error.value.code in (400, 404)
    report = urllib.request.urlopen(url + "results/run-1/report.html")
    assert report.headers["Content-Security-Policy"].startswith("sandbox")
    form = urllib.request.Request(
        url + "api/generate", data=b"prompt=x", headers={"Content-Type": "text/plain"}
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(form)
    assert error.value.code == 400 and b"application/json" in error.value.read()


@pytest.mark.slow
def test_embedded_model_extract_and_generate_in_the_page(browser, smollm2, tmp_path):
    """SmolLM2: extract a vector from an uploaded file of pairs, steer at layer 16, get the library's text."""
    from steerlab.playground import Playground, running

    pairs = load_builtin("sentiment")[:12]
    upload = tmp_path / "pairs.json"
    upload.write_text(json.dumps({"positive": pairs.positive, "negative": pairs.negative}))
    playground = Playground(smollm2)
    try:
        with running(playground) as url:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("body[data-ready=true]")
            page.click("#extract-box summary")
            page.select_option("#extract-source", "upload")
            page.set_input_files("#extract-file", str(upload))
            page.fill("#extract-layers", "16")
            page.click("#extract")
            page.wait_for_function(
                "() => document.querySelector('#extract-status').textContent.startsWith('extracted')",
                timeout=120_000,
            )
            (entry,) = playground.vectors.values()
            set_up_generation(page, entry.id, 16, fraction=0.15, max_new_tokens=16)
            page.click("#generate")
            page.wait_for_selector("body[data-generation=done]", timeout=120_000)
            text, ids, _ = read_side(page, "steered")
            plain = page.get_attribute("#out-unsteered", "data-text")
            page.close()
    finally:
        playground.close()
    vector = entry.vector
    assert (text, ids) == library_generation(
        smollm2, vector, 16, vector.multiplier_for_fraction(16, 0.15), max_new_tokens=16
    )
    assert text != plain
