"""The OpenAI-compatible server, driven by the official ``openai`` client against uvicorn on the
loopback address: every answer is the one ``Decoder.generate`` gives its prompt, recipe and seed
alone, streamed or not, under load; bad requests are 400 naming the field; a full queue is 429;
a request past its time is cancelled; a client that goes away mid-stream frees its row.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from dllm_decode.config import load_recipe
from dllm_decode.engine import Decoder
from dllm_decode.measure.tasks import get_task
from dllm_decode.models import load_model
from dllm_decode.serve.decoders import length_overrides
from dllm_decode.serve.server import create_app
from shipped import MODELS

MODEL = "llada-reference"
# what max_tokens=32 makes of the one-block llada recipe and of threshold's blocks of 32
SHORT = ("generation.gen_length=32", "generation.block_length=32", "generation.steps=32")
# a request that takes hundreds of steps: LLaDA commits one token per step
LONG = {"max_tokens": 900, "extra_body": {"recipe": "llada"}}
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"   # the messages' text, as is


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.lru_cache(maxsize=None)
def reference():
    model, tok = load_model(MODELS / "llada-reference")
    prompts = [p.prompt for name in ("copy", "repeat", "case") for p in get_task(name).problems("test", 4)]
    return model, tok, prompts


@functools.lru_cache(maxsize=None)
def decoder(recipe: str, overrides: tuple[str, ...] = SHORT) -> Decoder:
    model, tok, _ = reference()
    return Decoder(model, load_recipe(recipe, overrides=list(overrides)), tokenizer=tok)


def alone(prompt: str, recipe: str = "threshold", seed: int | None = None, temperature: float | None = None,
          overrides: tuple[str, ...] = SHORT):
    """``Decoder.generate`` on this prompt alone: its row (text, tokens)."""
    extra = (f"generation.temperature={temperature}",) if temperature is not None else ()
    dec = decoder(recipe, overrides + extra)
    ids = reference()[1](prompt, add_special_tokens=False)["input_ids"]
    return dec.generate([ids], seeds=None if seed is None else [seed]).rows[0]


def stop_index(tokens: list[int]) -> int:
    return next((i for i, t in enumerate(tokens) if t in (2, 3)), len(tokens))     # EOS, EoT


def wait_until(check, what: str, limit_s: float = 120.0):
    """Poll ``check`` until it is true; a bound on the wait, not a timing assertion."""
    end = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < end, f"never happened: {what}"
        time.sleep(0.02)


class Server:
    """uvicorn serving ``app`` on 127.0.0.1 at a free port, in a background thread."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.sock, self.port = sock, sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), "uvicorn started")
        assert self.server.started, "uvicorn did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not shut down"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def health(self) -> dict:
        return httpx.get(self.url + "/health").json()

    def post(self, path: str, body) -> httpx.Response:
        content = body if isinstance(body, str) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers={"content-type": "application/json"})


@pytest.fixture(scope="module")
def main():
    model, tok, _ = reference()
    with Server(create_app(model, tok, recipe="threshold", model_name=MODEL, max_batch=8, max_waiting=64,
                           timeout_s=300)) as server:
        yield server


@pytest.fixture(scope="module")
def small():
    """One row, one waiting place, and a tokenizer with a chat template."""
    model, tok, _ = reference()
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = TEMPLATE
    with Server(create_app(model, chat_tok, recipe="llada", model_name=MODEL, max_batch=1, max_waiting=1,
                           timeout_s=300)) as server:
        yield server


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize("recipe,seed,temperature", [(None, None, None), ("llada", 3, None), (None, 5, 0.8),
                                                     ("llada", 11, 1.0)])
def test_a_completion_is_the_decoders_answer_alone(main, recipe, seed, temperature):
    _, tok, prompts = reference()
    client = main.client()
    for prompt in (prompts[0], prompts[4], prompts[8]):         # copy, repeat, case
        extra = {k: v for k, v in (("seed", seed), ("temperature", temperature)) if v is not None}
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, extra_body={"recipe": recipe},
                                      **extra)
        row = alone(prompt, recipe or "threshold", seed, temperature)
        n = stop_index(row.tokens)
        assert r.choices[0].text == row.text
        assert r.choices[0].finish_reason == ("stop" if n < 32 else "length")
        assert r.usage.prompt_tokens == len(row.prompt) and r.usage.completion_tokens == n
        assert r.model == MODEL and r.object == "text_completion"


def test_token_id_prompts_and_the_neutral_fields_clients_send(main):
    _, tok, prompts = reference()
    ids = tok(prompts[5], add_special_tokens=False)["input_ids"]
    r = main.client().completions.create(model=MODEL, prompt=ids, max_tokens=32, n=1, user="someone", top_p=1,
                                         stop=None, frequency_penalty=0, presence_penalty=0, echo=False)
    assert r.choices[0].text == alone(prompts[5]).text


def test_max_tokens_rounds_up_to_whole_blocks_and_cuts_the_answer(main):
    """threshold's blocks of 32: 40 tokens decode as two blocks (64, the steps per block kept)
    and the answer stops at 40; the copy task's answer is longer, so it ends by length."""
    prompt = reference()[2][0]
    r = main.client().completions.create(model=MODEL, prompt=prompt, max_tokens=40)
    row = alone(prompt, overrides=("generation.gen_length=64", "generation.block_length=32", "generation.steps=64"))
    n = min(stop_index(row.tokens), 40)
    assert n == 40 and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 40
    assert r.choices[0].text == reference()[1].decode(row.tokens[:40], skip_special_tokens=True)


def test_length_overrides_keep_tokens_per_step():
    gen = lambda name: load_recipe(name).generation                       # noqa: E731
    assert length_overrides(gen("llada"), 40) == ["generation.gen_length=40", "generation.block_length=40",
                                                  "generation.steps=40"]
    assert length_overrides(gen("threshold"), 33) == ["generation.gen_length=64", "generation.block_length=32",
                                                      "generation.steps=64"]
    assert length_overrides(gen("threshold"), 96) == ["generation.gen_length=96", "generation.block_length=32",
                                                      "generation.steps=96"]
    half = load_recipe("llada", overrides=["generation.steps=48", "generation.max_steps=100"]).generation
    assert length_overrides(half, 32) == ["generation.gen_length=32", "generation.block_length=32",
                                          "generation.steps=16", "generation.max_steps=34"]


def test_max_tokens_bounds_a_canvas_that_grows(main):
    """DAEDAL starts at max_tokens and adds masks while the model is not sure the answer has
    ended: the answer is still at most max_tokens long, the first max_tokens tokens of the
    decode alone, and the request leaves when its committed prefix holds them."""
    prompt = reference()[2][0]
    scheduler = main.app.state.service.worker.scheduler
    before = scheduler.forwards
    r = main.client().completions.create(model=MODEL, prompt=prompt, max_tokens=32, extra_body={"recipe": "daedal"})
    forwards = scheduler.forwards - before
    row = alone(prompt, "daedal", overrides=tuple(length_overrides(load_recipe("daedal").generation, 32)))
    assert len(row.tokens) > 32                        # the canvas grew past max_tokens
    # once the committed prefix held 32 tokens the answer was settled: the request left
    assert forwards < row.nfe, (forwards, row.nfe)
    n = min(stop_index(row.tokens), 32)
    assert r.usage.completion_tokens == n and r.choices[0].finish_reason == ("stop" if n < 32 else "length")
    assert r.choices[0].text == reference()[1].decode(row.tokens[:n], skip_special_tokens=True)


def test_a_streamed_completion_adds_up_to_the_answer(main):
    prompt = reference()[2][1]
    stream = main.client().completions.create(model=MODEL, prompt=prompt, max_tokens=32, stream=True,
                                              extra_body={"recipe": "llada"}, stream_options={"include_usage": True})
    assert stream.response.headers["cache-control"] == "no-cache"       # no proxy holds the events back
    chunks = list(stream)
    row = alone(prompt, "llada")
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == row.text and len(texts) > 1          # it grew over several steps
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop" if stop_index(row.tokens) < 32 else "length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == stop_index(row.tokens)


def test_chat_needs_a_chat_template(main):
    with pytest.raises(openai.BadRequestError) as err:
        main.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert err.value.param == "messages" and "chat template" in err.value.message


def test_chat_completions_streamed_and_not(small):
    """The template renders the messages' text as it is, so a chat answer is the completion of
    that text."""
    prompt = reference()[2][6]
    row = alone(prompt, "llada")
    client = small.client()
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=32)
    assert r.choices[0].message.content == row.text and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len(row.prompt)
    parts = [{"type": "text", "text": prompt[:5]}, {"type": "text", "text": prompt[5:]}]
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}],
                                            max_completion_tokens=32, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == row.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def first_holding(tokens: list[int], stop: str) -> int:
    """The fewest leading tokens whose text holds ``stop`` (a linear scan)."""
    tok = reference()[1]
    return next(m for m in range(1, len(tokens) + 1) if stop in tok.decode(tokens[:m], skip_special_tokens=True))


def test_stop_strings_end_the_answer_and_the_decoding():
    """lm-eval's `until`: the answer ends before the first stop string (left out, as OpenAI does),
    finish_reason "stop", the tokens counted up to the one completing it; once the committed
    prefix holds it the request leaves, streamed or not, before its canvas is decoded (LLaDA one
    token a step in blocks of 32: the prefix reaches the answer's first line in the second block)."""
    model, tok, prompts = reference()
    prompt = prompts[0]                                # copy: the letters, "\n", "#### letters"
    semi_ar = ("generation.gen_length=96", "generation.block_length=32", "generation.steps=96")
    row = alone(prompt, "llada", overrides=semi_ar)
    want = row.text[:row.text.index("\n")]
    assert 0 < len(want) < len(row.text)
    with Server(create_app(model, tok, recipe="llada", overrides=["generation.block_length=32"], model_name=MODEL,
                           max_batch=1)) as server:
        client, scheduler = server.client(), server.app.state.service.worker.scheduler
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=96, stop=["\n", "zz-not-there"])
        assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == first_holding(row.tokens, "\n")
        assert scheduler.forwards < 96                 # it left before its 96 one-token steps
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=96, stop="\n#",
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
        assert scheduler.forwards < 2 * 96
        # a stop string the answer never writes changes nothing
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=96, stop="@")
        assert r.choices[0].text == row.text and r.usage.completion_tokens == stop_index(row.tokens)


def test_a_list_of_prompts_gets_a_choice_each(main):
    """lm-eval's local-completions sends a batch's prompts in one request: one choice each, in
    order, each the prompt's answer alone; the usage adds up."""
    _, tok, prompts = reference()
    asked = [prompts[0], prompts[4], tok(prompts[8], add_special_tokens=False)["input_ids"]]
    r = main.client().completions.create(model=MODEL, prompt=asked, max_tokens=32, seed=7, stop=["\n"])
    rows = [alone(p, seed=7) for p in (prompts[0], prompts[4], prompts[8])]
    want = [row.text.split("\n")[0] for row in rows]
    assert [c.index for c in r.choices] == [0, 1, 2] and [c.text for c in r.choices] == want
    assert r.usage.prompt_tokens == sum(len(row.prompt) for row in rows)


def test_a_tiny_temperature_decodes_greedily(main):
    """As vLLM's does: below 1e-5 the recipe's logits / temperature would overflow."""
    prompt = reference()[2][1]
    r = main.client().completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=5e-324)
    assert r.choices[0].text == alone(prompt, temperature=0.0).text


def test_apd_decoders_share_one_verifier():
    """Each max_tokens makes its own decoder; the verifier model is loaded once for all."""
    from dllm_decode.serve.decoders import DecoderPool

    model, tok, _ = reference()
    pool = DecoderPool(model, tok, "threshold")
    (a, _), (b, _) = pool.for_request("apd", 10, None), pool.for_request("apd", 11, 0.5)
    assert a is not b and a.aux and a.aux.keys() == b.aux.keys()
    assert all(a.aux[p][k] is b.aux[p][k] for p in a.aux for k in a.aux[p])


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "foo": 1}, "foo"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "32"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 5_000_000}, "max_tokens"),   # past generation.gen_length's bound
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": "0.5"}, "temperature"),      # numbers are strict, as OpenAI's are
    ({"prompt": "x", "top_p": True}, "top_p"),
    ({"prompt": "x", "temperature": 1000}, "temperature"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),   # OpenAI takes at most four
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),   # without stream
    ({"prompt": "x", "recipe": "nope"}, "recipe"),
    ({"prompt": "x", "recipe": "recipes/llada.yaml"}, "recipe"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": ["x", "y"], "stream": True}, "prompt"),       # a stream carries one prompt
    ({"prompt": ["x", 5]}, "prompt"),
    ({"prompt": ["x", ""]}, "prompt"),
    ({"prompt": "é"}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "max_tokens": 1100}, "prompt"),           # the canvas exceeds the model's length
])
def test_bad_requests_are_400_naming_the_field(main, body, param):
    r = main.post("/v1/completions", {"model": MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_malformed_json_unknown_model_and_bad_messages(main):
    r = main.post("/v1/completions", '{"model": "llada-reference", "prompt": ')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = main.post("/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = main.post("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 0}, "max_tokens": 8})
    assert r.status_code == 200                        # a zero bias is neutral
    r = main.post("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 1.5}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    r = main.post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    with pytest.raises(openai.BadRequestError) as err:                 # through the client too
        main.client().completions.create(model=MODEL, prompt="x", temperature=-1)
    assert err.value.param == "temperature"


def test_models_and_health(main):
    assert [m.id for m in main.client().models.list()] == [MODEL]
    assert main.client().models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        main.client().models.retrieve("gpt-4")
    assert main.health() == {"status": "ok", "running": 0, "waiting": 0}


# ----------------------------------------------------------------------------- limits


def test_a_full_queue_is_429_and_a_client_gone_mid_stream_frees_its_row(small):
    client = small.client()
    prompts = reference()[2]
    first = client.completions.create(model=MODEL, prompt=prompts[0], stream=True, **LONG)
    wait_until(lambda: small.health()["running"] == 1, "the long request runs")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        queued = pool.submit(client.completions.create, model=MODEL, prompt=prompts[4], max_tokens=32)
        wait_until(lambda: small.health()["waiting"] == 1, "the second request waits")
        with pytest.raises(openai.RateLimitError) as err:
            client.completions.create(model=MODEL, prompt=prompts[8], max_tokens=32)
        assert err.value.code == "queue_full"
        first.close()                                  # the client goes away mid-stream
        assert queued.result().choices[0].text == alone(prompts[4], "llada").text
    wait_until(lambda: small.health() == {"status": "ok", "running": 0, "waiting": 0}, "the rows are free")
    # the long request was cut short: its 900 steps were never all taken
    assert small.app.state.service.worker.scheduler.forwards < 900
    r = client.completions.create(model=MODEL, prompt=prompts[9], max_tokens=32)
    assert r.choices[0].text == alone(prompts[9], "llada").text


def test_a_client_gone_before_its_answer_frees_its_row(small):
    scheduler = small.app.state.service.worker.scheduler
    before = scheduler.forwards
    body = {"model": MODEL, "prompt": reference()[2][0], "max_tokens": 900, "recipe": "llada"}
    with pytest.raises(httpx.ReadTimeout):             # the client stops waiting and hangs up
        httpx.post(small.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    wait_until(lambda: small.health() == {"status": "ok", "running": 0, "waiting": 0}, "the row is free")
    assert scheduler.forwards - before < 900


def test_a_request_past_its_time_is_cancelled():
    model, tok, prompts = reference()
    with Server(create_app(model, tok, recipe="threshold", model_name=MODEL, timeout_s=0.5)) as server:
        client = server.client()
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model=MODEL, prompt=prompts[0], **LONG)
        assert err.value.status_code == 504 and err.value.code == "timeout"
        with pytest.raises(openai.APIError, match="did not finish within"):
            list(client.completions.create(model=MODEL, prompt=prompts[1], stream=True, **LONG))
        wait_until(lambda: server.health()["running"] == 0, "the timed-out requests leave")
        r = client.completions.create(model=MODEL, prompt=prompts[2], max_tokens=32)
        assert r.choices[0].text == alone(prompts[2]).text


def test_64_requests_from_8_clients_each_get_their_answer_alone(main):
    """Bounded load: 64 requests (two recipes, greedy and sampled, each its own seed) from 8
    threads; every one is answered, with exactly the tokens it gets alone."""
    prompts = reference()[2]
    client = main.client()

    def ask(i: int):
        recipe, temperature = ("llada" if i % 8 == 0 else None), (0.7 if i % 2 else None)
        extra = {"temperature": temperature} if temperature is not None else {}
        if i % 4 == 3:
            chunks = client.completions.create(model=MODEL, prompt=prompts[i % 12], max_tokens=32, seed=i,
                                               stream=True, extra_body={"recipe": recipe}, **extra)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
        else:
            text = client.completions.create(model=MODEL, prompt=prompts[i % 12], max_tokens=32, seed=i,
                                             extra_body={"recipe": recipe}, **extra).choices[0].text
        return text, alone(prompts[i % 12], recipe or "threshold", i, temperature).text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(64)))
    assert len(answers) == 64
    wrong = [i for i, (got, want) in enumerate(answers) if got != want]
    assert not wrong, [(i, answers[i]) for i in wrong[:3]]
    assert main.health() == {"status": "ok", "running": 0, "waiting": 0}


# ----------------------------------------------------------------------------- command line


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_serve_command_serves_the_shipped_model(tmp_path):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dllm_decode", "serve", "--recipe", "threshold",
                             "--gen-length", "32", "--port", str(port), "--max-batch", "2"],
                            cwd=MODELS.parent, env=env, stderr=subprocess.PIPE, text=True)
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return False
        wait_until(up, "the server answers")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        prompt = reference()[2][3]
        r = client.completions.create(model=MODEL, prompt=prompt)       # --gen-length 32: the SHORT recipe
        assert r.choices[0].text == alone(prompt).text
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "using the shipped reference model" in err and f"127.0.0.1:{port}/v1" in err


def test_serve_without_fastapi_says_how_to_install_it():
    code = ("import sys; sys.modules['fastapi'] = None\n"
            "import dllm_decode, dllm_decode.cli, dllm_decode.serve.server\n"
            "from dllm_decode.cli import main\n"
            "assert main(['plugins', '--json']) == 0\n"
            "sys.exit(main(['serve']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "pip install 'dllm-decode[serve]'" in out.stderr and "fastapi" in out.stderr


def test_bad_serve_flags_name_the_flag(capsys):
    from dllm_decode.cli import main

    assert main(["serve", "--max-batch", "0"]) == 2
    assert "--max-batch 0: must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--timeout", "0"]) == 2
    assert "--timeout 0: must be positive" in capsys.readouterr().err
