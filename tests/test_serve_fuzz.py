"""`storm-vlm serve` under seeded, property-style fuzzing: valid bodies of every route (chat and
text completions, streaming or not, /v1/answer as JSON and multipart, the live-video sessions) are
mutated -- wrong types at every field, NaN / Infinity / huge numbers as raw JSON, lone surrogates,
NUL, long strings, deep nesting, missing, extra and repeated keys, truncated JSON, other content
types and encodings, bodies without a length, multipart parts with hostile names, file names and
charsets, data: and file: URLs to directories, devices, /proc, symbolic links and FIFOs -- and sent
to servers with and without local paths. Every answer is below 500 (a 503 carries Retry-After),
comes within a bound, has its route's JSON error shape, and the server answers a normal request
afterwards with no body slot or session left behind."""

import base64
import copy
import gzip
import json
import os
import random
import threading
import zlib

import pytest
from helpers import random_video, write_mp4
from PIL import Image

MODEL = "storm-tiny"
OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models")
CASE_TIMEOUT_S = 60  # far above any one case here; only a hang reaches it


class Raw:
    """JSON text put as it is into a body (NaN, 1e309, "\\ud800": what json.dumps would not write)."""

    def __init__(self, text: str):
        self.text = text


HOSTILE = [None, True, False, 0, -1, 1.5, -0.0, 2**63, 10**30, -10**30, Raw("1e309"), Raw("-1e309"), Raw("NaN"),
           Raw("Infinity"), Raw("-Infinity"), Raw("1" * 4000), Raw("1" * 5000), Raw("1e-400"), "", " ", "x" * 9000,
           Raw('"\\ud800"'), Raw('"a\\udfffb"'), "\x00", "a\x00b", [], {}, Raw("[" * 60 + "]" * 60),
           {"a": {"b": [1, {"c": None}]}}, ["a"] * 100, [None], [1, "a"], "../../etc/passwd", "<video>", "\u202e\ufeff",
           MODEL, "text", "user", "stream", "file:///dev/zero", "data:video/mp4;base64,!!",
           "data:image/png;base64," + "A" * 300_000, {"url": 5}, {"type": "text"}]


def _path_values(media) -> list[str]:
    """Paths on the server a hostile client may name."""
    return [str(media / "v.mp4"), str(media), str(media / "fifo"), str(media / "empty.mp4"), str(media / "to-zero"),
            str(media / "to-etc"), str(media / "loop"), str(media / "v.mp4" / "x"), str(media / ".." / "v.mp4"),
            "/dev/zero", "/proc/self/environ", "/proc/self/mem", "/proc/self/fd/0", "/", "/" + "a" * 5000,
            "relative.mp4"]


def _file_urls(media) -> list[str]:
    return ["file://" + p for p in _path_values(media)] + [
        f"file://localhost{media}/still.png", "file://evil/x", f"file:{media}/%2e%2e/{media.name}/v.mp4",
        f"file://{media}/%00.mp4", f"file://{media}/%ff.mp4", "file:relative"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder of what a request may name: a video, an image, an empty file, a FIFO, symbolic
    links to a device, outside the folder and to themselves."""
    folder = tmp_path_factory.mktemp("fuzz-media")
    write_mp4(folder / "v.mp4", random_video(6, seed=7))
    Image.new("RGB", (24, 16), (10, 200, 30)).save(folder / "still.png")
    (folder / "empty.mp4").write_bytes(b"")
    os.mkfifo(folder / "fifo")
    os.symlink("/dev/zero", folder / "to-zero")
    os.symlink("/etc/hostname", folder / "to-etc")
    os.symlink(folder / "loop", folder / "loop")
    yield folder
    try:  # a reader still blocked on the FIFO (were the check that refuses FIFOs gone) is let go
        os.close(os.open(folder / "fifo", os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.fixture(scope="module")
def servers(live_engine, media):
    """The same engine behind three servers: local paths refused (the default), any allowed
    (--allow-local-paths), and only inside `media` (--allowed-local-media-path)."""
    from fastapi.testclient import TestClient

    from storm_vlm.serve.api import create_app

    settings = {"closed": {}, "any": {"allow_local_paths": True}, "root": {"allowed_local_media_path": media}}
    return {name: TestClient(create_app(live_engine, max_upload_mb=0.2, model_name=MODEL, **kw),
                             raise_server_exceptions=False)
            for name, kw in settings.items()}


@pytest.fixture(scope="module")
def seeds(media):
    """Valid bodies of each JSON route, the starting points of the mutations."""
    video = base64.b64encode((media / "v.mp4").read_bytes()).decode()
    image = base64.b64encode((media / "still.png").read_bytes()).decode()
    text = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    user_media = [{"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{video}"}},
                  {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                  {"type": "text", "text": "What?"}]
    return {
        "/v1/chat/completions": [
            {"model": MODEL, "messages": text, "max_tokens": 1, "temperature": 0, "seed": 3, "stop": ["."]},
            {"messages": [{"role": "user", "content": user_media}], "max_tokens": 1, "num_frames": 2},
            {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": f"file://{media}/v.mp4"}]}],
             "max_completion_tokens": 1, "fps": 4.0, "temporal_sample_stride": 1},
            {"messages": text, "max_tokens": 1, "stream": True, "stream_options": {"include_usage": True}, "n": 1},
        ],
        "/v1/completions": [{"model": MODEL, "prompt": "Once", "max_tokens": 1, "echo": True, "top_p": 0.9},
                            {"prompt": ["Once"], "max_tokens": 1, "stream": True, "logprobs": None}],
        "/v1/answer": [{"video_path": str(media / "v.mp4"), "question": "What?", "options": ["a", "b"], "frames": 2,
                        "temporal_sample_stride": 1, "max_new_tokens": 1, "start": 0, "end": 1.5}],
        "/v1/sessions": [{"fps": 4, "temporal_sample_stride": 1, "max_visual_tokens": 64, "memory_policy": "window"}],
        "ask": [{"question": "What?", "options": ["a", "b"], "max_new_tokens": 1}],
    }


# ---------------------------------------------------------------- building hostile requests


def _dumps(value) -> str:
    """JSON text of `value`, with each Raw's text as it is."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_dumps(v) for v in value) + "]"
    return json.dumps(value)


def _slots(value, path=()):
    """Every (path, container) in `value`: where a value can be replaced or removed."""
    found = [path]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found.extend(_slots(item, (*path, key)))
    return found


def _pick(rng: random.Random, pool: list):
    """A value of `pool`, copied: a later mutation must not change the pool's own lists."""
    return copy.deepcopy(rng.choice(pool))


def _mutate_json(rng: random.Random, body, extra_values=()) -> str:
    """`body` with one to three of: a value replaced, a key removed or added; then as JSON text,
    perhaps with a key repeated, truncated, or replaced by another JSON document."""
    body = json.loads(json.dumps(body))
    pool = HOSTILE + list(extra_values)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        path = rng.choice(_slots(body))
        if not path:
            if rng.random() < 0.1:
                body = _pick(rng, pool)
            elif isinstance(body, dict):
                body[rng.choice(["extra", "model", "messages", "question", "n", "stream"])] = _pick(rng, pool)
            continue
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        action = rng.random()
        if action < 0.7:
            parent[path[-1]] = _pick(rng, pool)
        elif action < 0.85 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, list):
            parent.append(_pick(rng, pool))
        else:
            parent[rng.choice(["x", "url", "type", "role"])] = _pick(rng, pool)
    text = _dumps(body)
    roll = rng.random()
    if roll < 0.08 and text.startswith("{") and len(text) > 2:
        key = rng.choice(['"model"', '"messages"', '"question"', '"stream"', '"prompt"', '"fps"'])
        text = "{" + f"{key}:{_dumps(_pick(rng, pool))}," + text[1:]  # a repeated key: which one wins?
    elif roll < 0.14:
        text = text[:rng.randrange(len(text) + 1)]
    elif roll < 0.17:
        text = rng.choice(["", "null", "[]", '"x"', "1", "{}", "\ufeff{}", "{" * 3000, "[" * 200_000, "\x00"])
    return text


def _json_request(rng: random.Random, text: str) -> dict:
    """httpx keyword arguments sending `text` as a body: mostly as JSON, else with another or no
    content type, gzip / deflate encoded, or without a length (chunked)."""
    headers = {"content-type": "application/json"}
    if rng.random() < 0.15:
        headers["content-type"] = rng.choice(["", "text/plain", "application/json; charset=latin-1", "APPLICATION/JSON",
                                              "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"])
    data = text.encode("utf-8", "surrogatepass")
    roll = rng.random()
    if roll < 0.05:
        headers["content-encoding"] = "gzip"
        data = gzip.compress(data)
    elif roll < 0.08:
        headers["content-encoding"] = "deflate"
        data = zlib.compress(data)
    elif roll < 0.1:
        data = b"\xff\xfe" + data  # not UTF-8
    if rng.random() < 0.1:
        whole = data
        return {"content": iter([whole[i:i + 4096] for i in range(0, len(whole), 4096)] or [b""]), "headers": headers}
    return {"content": data, "headers": headers}


_FORM_VALUES = [b"", b" ", b"1", b"2", b"0", b"-1", b"nan", b"inf", b"1e309", b"9" * 5000, b"1.5", b"\x00", b"a\x00b",
                b"\xff\xfe", b"\xed\xa0\x80", b"\\ud800", b"[NaN, 1]", b'["a", "b"]', b'[{"a": NaN}, "b"]',
                b"[" * 2000, b'["\\ud800", "b"]', b"x" * 9000, b"<video>"]
_FILE_NAMES = [b"clip.mp4", b"../../etc/passwd", b"a\x00b.mp4", b"", b"..", b"/", b"a\\ud800.mp4", b"\xff.mp4",
               b"x" * 300, b'a"b.mp4', b"C:\\\\x.mp4"]
_CHARSETS = [None] * 6 + ["utf-8", "latin-1", "unicode_escape", "utf-16", "bogus", "utf-8-sig"]


def _multipart(rng: random.Random, media) -> dict:
    """An /v1/answer multipart upload with hostile fields, names, file names, file bytes and charset."""
    video = (media / "v.mp4").read_bytes()
    fields = [(b"question", b"What?"), (b"options", b"a"), (b"options", b"b"), (b"frames", b"2"),
              (b"max_new_tokens", b"1"), (b"start", b"0"), (b"end", b"1.5")]
    for _ in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.5 and fields:
            i = rng.randrange(len(fields))
            fields[i] = (fields[i][0], rng.choice(_FORM_VALUES))
        elif roll < 0.65 and fields:
            fields.pop(rng.randrange(len(fields)))
        elif roll < 0.8:
            fields.append((rng.choice([b"options", b"question", b"extra", b"vid\xffeo", b"fr\\ud800", b"video"]),
                           rng.choice(_FORM_VALUES)))
        elif roll < 0.85:
            fields.extend((b"f%d" % i, b"x") for i in range(70))  # more fields than the form takes
        else:
            fields.append((b"question", b"q" * 1_100_000))  # a part larger than the form takes
    files = [(rng.choice(_FILE_NAMES), rng.choice([video] * 4 + [b"", b"junk", video[:300], b"x" * 300_000]))]
    if rng.random() < 0.1:
        files.append((b"second.mp4", video))
    if rng.random() < 0.1:
        files = []
    boundary = b"fuzz-boundary"
    parts = [b'Content-Disposition: form-data; name="%s"\r\n\r\n%s' % field for field in fields]
    parts += [b'Content-Disposition: form-data; name="video"; filename="%s"\r\nContent-Type: video/mp4\r\n\r\n%s'
              % file for file in files]
    rng.shuffle(parts)
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"
    if rng.random() < 0.1:
        body = body[:rng.randrange(len(body))]
    charset = rng.choice(_CHARSETS)
    content_type = "multipart/form-data; boundary=fuzz-boundary" + (f"; charset={charset}" if charset else "")
    return {"content": body, "headers": {"content-type": content_type}}


# ---------------------------------------------------------------- checking answers


def _within(seconds: float, fn, what: str):
    """fn() run with a time bound: a request that does not come back is a hang, reported with the case."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"no answer within {seconds} s: {what}"
    return result[0]


def _check(r, path: str, what: str) -> None:
    """An answer a client can act on: below 500 (a 503 with Retry-After), and an error is JSON of
    the route's shape: OpenAI's error object on the OpenAI routes and for a method or path the
    server does not have, FastAPI's {"detail": ...} on the others."""
    assert r.status_code < 500 or (r.status_code == 503 and r.headers.get("retry-after")), (r.status_code, r.text[:300],
                                                                                           what)
    if r.request.method == "HEAD" or not r.headers.get("content-type", "").startswith("application/json"):
        assert r.status_code < 400 or r.request.method == "HEAD", (r.status_code, r.text[:300], what)
        return
    body = r.json()
    if r.status_code < 400:
        return
    if path.startswith(OPENAI_ROUTES) or r.status_code == 405 or "error" in body:
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str), (body, what)
    else:
        assert set(body) == {"detail"} and isinstance(body["detail"], (str, list)), (body, what)


def _check_stream(r, what: str) -> None:
    """A 200 stream ends with [DONE], or with OpenAI's error object as its last event."""
    if r.status_code != 200 or not r.headers.get("content-type", "").startswith("text/event-stream"):
        return
    events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events and (events[-1] == "[DONE]" or "error" in json.loads(events[-1])), (r.text[-300:], what)


def _still_serves(client) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert client.get("/health").status_code == 200
    assert client.app.state.body_slots.busy == 0  # every body slot given back


# ---------------------------------------------------------------- the fuzz


def _one_case(rng: random.Random, client, media, seeds) -> None:
    """One hostile request to a route picked at random (for a session route, on a live session)."""
    paths = _path_values(media) + _file_urls(media)
    kind = rng.choice(["/v1/chat/completions"] * 4 + ["/v1/completions"] * 2 + ["/v1/answer", "multipart"] * 2
                      + ["/v1/sessions", "chunks", "ask", "any route"])
    send = client.request
    if kind in ("/v1/chat/completions", "/v1/completions", "/v1/answer", "/v1/sessions"):
        text = _mutate_json(rng, rng.choice(seeds[kind]), paths)
        method, path, kwargs = "POST", kind, _json_request(rng, text)
    elif kind == "multipart":
        method, path, kwargs = "POST", "/v1/answer", _multipart(rng, media)
    elif kind == "any route":
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
        path = rng.choice(["/health", "/v1/models", f"/v1/models/{MODEL}", "/v1/models/%00", "/v1/models/%ED%A0%80",
                           "/docs", "/redoc", "/openapi.json", "/v1/sessions/none", "/v1/sessions/%ff/ask",
                           "/v1/sessions/x/chunks", "/v1/../health", "/v1/chat/completions/", "//v1/models", "/v1",
                           "/v1/models/" + "a" * 2000, "/v1/answer", "/v1/completions"])
        kwargs = {"content": b"{}", "headers": {"content-type": "application/json"}} if method != "GET" else {}
    else:
        created = client.post("/v1/sessions", json={"fps": 4, "max_visual_tokens": 64})
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        try:
            if kind == "chunks":
                data = rng.choice([(media / "v.mp4").read_bytes()] * 3 + [b"", b"junk", b"\x47" + b"\x00" * 187,
                                                                          b"x" * 300_000])
                content_type = rng.choice(["video/mp4", "application/octet-stream", "video/mp2t", "",
                                           "application/json", "multipart/form-data; boundary=x"])
                kwargs = {"content": iter([data]) if rng.random() < 0.2 else data,
                          "headers": {"content-type": content_type} if content_type else {}}
                path = f"/v1/sessions/{sid}/chunks"
            else:
                path = f"/v1/sessions/{sid}/ask"
                kwargs = _json_request(rng, _mutate_json(rng, rng.choice(seeds["ask"])))
            what = f"POST {path} {str(kwargs)[:300]}"
            r = _within(CASE_TIMEOUT_S, lambda: client.post(path, **kwargs), what)
            _check(r, path, what)
        finally:
            client.delete(f"/v1/sessions/{sid}")
        return
    what = f"{method} {path} {str(kwargs)[:300]}"
    r = _within(CASE_TIMEOUT_S, lambda: send(method, path, **kwargs), what)
    _check(r, path, what)
    _check_stream(r, what)
    if kind == "/v1/sessions" and r.status_code == 201:
        client.delete(f"/v1/sessions/{r.json()['id']}")


def _fuzz(servers, media, seeds, cases: int, seed: int) -> None:
    rng = random.Random(seed)
    names = sorted(servers)
    for _ in range(cases):
        _one_case(rng, servers[rng.choice(names)], media, seeds)
    for client in servers.values():
        _still_serves(client)
        assert len(client.app.state.sessions) == 0


def test_every_route_lists_what_the_fuzz_reaches(servers):
    """The fuzz above covers each route the app has (a route added later must be added to it)."""
    reached = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/health", "/v1/models",
               "/v1/models/{model:path}", "/v1/chat/completions", "/v1/completions", "/v1/answer", "/v1/sessions",
               "/v1/sessions/{sid}", "/v1/sessions/{sid}/chunks", "/v1/sessions/{sid}/ask"}
    assert {route.path for route in servers["closed"].app.routes} == reached


@pytest.mark.parametrize("seed", [0, 1])
def test_hostile_requests_are_4xx_and_the_server_keeps_serving(servers, media, seeds, seed):
    _fuzz(servers, media, seeds, cases=200, seed=seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 20))
def test_hostile_requests_long_run(servers, media, seeds, seed):
    _fuzz(servers, media, seeds, cases=1000, seed=seed)


# ---------------------------------------------------------------- single cases of what the fuzz checks


def test_non_finite_numbers_in_answer_json_are_422_not_500(servers, media):
    """pydantic keeps a refused input in its error; NaN or Infinity there cannot be rendered as
    JSON (FastAPI's own 422 would be a 500), so an error shows only short, finite scalar inputs."""
    client = servers["any"]
    for raw in ('{"video_path": "%s", "question": "q", "start": NaN}',
                '{"video_path": "%s", "question": "q", "x": 1e309}',
                '{"video_path": "%s", "question": "q", "options": [Infinity, "b"]}',
                '{"question": NaN, "video_path": "%s"}'):
        r = client.post("/v1/answer", content=raw % (media / "v.mp4"), headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert all(isinstance(e["msg"], str) and set(e) <= {"type", "loc", "msg", "input"} for e in r.json()["detail"])
    r = client.post("/v1/answer", files={"video": ("a.mp4", (media / "v.mp4").read_bytes(), "video/mp4")},
                    data={"question": "q", "options": '[NaN, "b"]'})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["options", 0], r.text


def test_validation_errors_do_not_echo_the_body(servers, media):
    """A missing field's error holds the whole body as its input: it is not sent back (up to 1 MB)."""
    question = "q" * 100_000
    r = servers["any"].post("/v1/answer", json={"question": question, "padding": "p" * 500_000})
    assert r.status_code == 422 and len(r.content) < 2000, len(r.content)


def test_multipart_text_that_is_not_unicode_is_422_not_500(servers, media):
    """A multipart form's charset decides how its fields and file name are decoded; one that yields
    lone surrogates (charset=unicode_escape and "\\ud800") is refused, and the file name in a
    decoding error has U+FFFD for them (UTF-8 cannot carry them: the error would be a 500)."""
    video = (media / "v.mp4").read_bytes()

    def post(fields: bytes, filename: bytes, data: bytes):
        body = (b'--b\r\nContent-Disposition: form-data; name="question"\r\n\r\n' + fields + b"\r\n"
                b'--b\r\nContent-Disposition: form-data; name="video"; filename="' + filename + b'"\r\n\r\n'
                + data + b"\r\n--b--\r\n")
        content_type = "multipart/form-data; boundary=b; charset=unicode_escape"
        return servers["closed"].post("/v1/answer", content=body, headers={"content-type": content_type})

    r = post(b"\\ud800", b"a.mp4", video)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["question"], r.text
    r = post(b"What?", b"clip\\ud800.mp4", b"junk")
    assert r.status_code == 422 and r.json()["detail"].startswith("clip\ufffd.mp4: not a readable"), r.text


def test_an_image_url_naming_a_fifo_or_device_is_400_not_a_hang(servers, media):
    """Image paths are checked as video paths are before PIL opens them: opening a FIFO would block
    the worker thread and the request's body slot for ever (four such requests, and every chat
    completion waits, then 503s)."""
    for server, name in (("root", "fifo"), ("any", "fifo"), ("any", "to-zero"), ("root", ".")):
        url = f"file://{media / name}"
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
        r = _within(20, lambda: servers[server].post("/v1/chat/completions", json=body), url)
        assert r.status_code == 400 and "the image: is " in r.json()["error"]["message"], r.text
    _still_serves(servers["root"])


def test_an_infinite_upload_limit_is_refused_up_front(qwen2_mamba_dir, live_engine, capsys):
    """--max-upload-mb inf is a one-line error before the model loads, not an OverflowError
    traceback from building the app."""
    from storm_vlm.cli import main
    from storm_vlm.errors import StormError
    from storm_vlm.serve.api import create_app

    assert main(["serve", str(qwen2_mamba_dir), "--max-upload-mb", "inf", "--port", "0"]) == 2
    assert "--max-upload-mb must be a finite number" in capsys.readouterr().err
    with pytest.raises(StormError, match="max_upload_mb"):
        create_app(live_engine, max_upload_mb=float("inf"))


def test_answer_json_is_parsed_off_the_event_loop_and_bounded(servers, media, monkeypatch):
    """/v1/answer's JSON body (up to 1 MB) is parsed in a worker thread, its values bounded (a body
    of small values costs ~25 times its size once parsed), as chat bodies are."""
    import asyncio

    import storm_vlm.serve.api as api

    on_loop = []

    def spy(*args):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return parse_json(*args)

    parse_json = api.parse_json
    monkeypatch.setattr(api, "parse_json", spy)
    client = servers["any"]
    r = client.post("/v1/answer", json={"video_path": str(media / "v.mp4"), "question": "q", "max_new_tokens": 1})
    assert r.status_code == 200 and on_loop == [False], (r.text, on_loop)
    r = client.post("/v1/answer", content="[" + "0," * 400_000 + "0]", headers={"content-type": "application/json"})
    assert r.status_code == 413 and "JSON values" in r.json()["detail"], r.text
