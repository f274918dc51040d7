"""Live-video sessions (`storm_vlm.serve.sessions`) under what real clients do: a segment damaged
after some frames keeps those frames (as `storm-vlm watch` does); a session deleted while its
requests wait or run does no more work for them and answers 404; an MP4 segment cut off is named
truncated; parameters the model cannot use are 422."""

import gc
import threading
import time
import weakref

import pytest
from helpers import encode_video, random_video

from storm_vlm.streaming import sources
from storm_vlm.video import VideoDecodeError

FPS = 4  # frames sampled per second; segments are written at 8 fps


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    """3 s of MPEG-TS at 8 fps: 12 frames at FPS."""
    path = tmp_path_factory.mktemp("audit-segments") / "seg.ts"
    return encode_video(path, random_video(24, 32, 32, seed=1), 8, "mpeg4", fmt="mpegts").read_bytes()


def _post(live_client, sid, data):
    return live_client.post(f"/v1/sessions/{sid}/chunks", content=data, headers={"content-type": "video/mp2t"})


def test_a_segment_damaged_after_some_frames_keeps_them(live_client, segment, monkeypatch):
    decode = sources.decode_segment

    def damaged_after_five(*args, **kwargs):  # as a segment whose bytes are garbled midway decodes
        for i, item in enumerate(decode(*args, **kwargs)):
            if i == 5:
                raise VideoDecodeError("the chunk: decoding stopped (Invalid data found when processing input)")
            yield item

    sid = live_client.post("/v1/sessions", json={"fps": FPS}).json()["id"]
    monkeypatch.setattr(sources, "decode_segment", damaged_after_five)
    r = _post(live_client, sid, segment)
    assert r.status_code == 200, r.text  # fewer frames than one encoding piece: they were dropped (a 422) before
    assert r.json()["frames_added"] == 5 and r.json()["frames"] == 5 and "decoding stopped" in r.json()["error"]
    monkeypatch.undo()
    assert _post(live_client, sid, segment).json()["frames"] == 17
    live_client.delete(f"/v1/sessions/{sid}")


def test_a_deleted_session_does_no_more_work_and_answers_404(live_client, segment, monkeypatch):
    store = live_client.app.state.sessions
    sid = live_client.post("/v1/sessions", json={"fps": FPS}).json()["id"]
    session = store.get(sid)
    results = {}
    with session.lock:  # a request of the session is running: these two wait for it
        waiting = [threading.Thread(target=lambda: results.update(chunk=_post(live_client, sid, segment))),
                   threading.Thread(target=lambda: results.update(
                       ask=live_client.post(f"/v1/sessions/{sid}/ask", json={"question": "What?"})))]
        for thread in waiting:
            thread.start()
        deadline = time.monotonic() + 30
        while session.busy < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert live_client.delete(f"/v1/sessions/{sid}").status_code == 204
    for thread in waiting:
        thread.join(30)
    assert results["chunk"].status_code == 404 and "was ended" in results["chunk"].json()["detail"]
    assert results["ask"].status_code == 404
    assert session.stream.frames_seen == 0  # nothing was encoded for a session that no longer exists

    # deleted while a segment is being added: it stops at the next frame, and the memory goes with the session
    sid = live_client.post("/v1/sessions", json={"fps": FPS}).json()["id"]
    session = store.get(sid)
    stream = weakref.ref(session.stream)
    decode = sources.decode_segment

    def deleted_midway(*args, **kwargs):
        for i, item in enumerate(decode(*args, **kwargs)):
            if i == 2:
                store.delete(sid)
            yield item

    monkeypatch.setattr(sources, "decode_segment", deleted_midway)
    r = _post(live_client, sid, segment)
    assert r.status_code == 404 and session.stream.frames_seen == 0, r.text
    del session
    gc.collect()
    assert stream() is None


def test_a_cut_off_mp4_segment_is_named_truncated_and_bad_parameters_are_422(live_client, tmp_path):
    clip = encode_video(tmp_path / "clip.mp4", random_video(24, 32, 32, seed=2), 8, "mpeg4").read_bytes()
    sid = live_client.post("/v1/sessions", json={"fps": FPS}).json()["id"]
    r = live_client.post(f"/v1/sessions/{sid}/chunks", content=clip[: len(clip) // 2], headers={"content-type": "video/mp4"})
    assert r.status_code == 422 and "truncated" in r.json()["detail"], r.text
    garbage = _post(live_client, sid, b"not a video at all" * 10).json()["detail"]
    assert "not a readable video stream" in garbage and "--format" not in garbage  # a command-line flag
    live_client.delete(f"/v1/sessions/{sid}")
    for budget, cause in [(1, "less than one frame"), (10**9, "no room for a question")]:
        r = live_client.post("/v1/sessions", json={"max_visual_tokens": budget})
        assert r.status_code == 422 and cause in r.json()["detail"], r.text


def test_requests_waiting_for_one_session_leave_the_server_free(live_client, segment):
    """Requests queued behind a busy session wait without holding a worker thread each: more of them
    than anyio's default of 40 worker threads must not stall other sessions (or the rest of the server)."""
    store = live_client.app.state.sessions
    busy_sid, other_sid = (live_client.post("/v1/sessions", json={"fps": FPS}).json()["id"] for _ in range(2))
    assert _post(live_client, other_sid, segment).status_code == 200
    busy = store.get(busy_sid)
    other = {}
    with live_client:  # one event loop and one pool of worker threads for every request, as in a server
        with busy.lock:  # a long segment of the busy session is being added
            queued = [threading.Thread(target=_post, args=(live_client, busy_sid, segment)) for _ in range(41)]
            for thread in queued:
                thread.start()
            deadline = time.monotonic() + 30
            while busy.busy < 41 and time.monotonic() < deadline:
                time.sleep(0.01)
            asking = threading.Thread(target=lambda: other.update(r=live_client.post(
                f"/v1/sessions/{other_sid}/ask", json={"question": "What?", "max_new_tokens": 2})))
            asking.start()
            asking.join(10)
            answered_meanwhile = not asking.is_alive()
        live_client.delete(f"/v1/sessions/{busy_sid}")  # the queued chunks end as 404s
        for thread in queued + [asking]:
            thread.join(60)
    assert answered_meanwhile and other["r"].status_code == 200
    live_client.delete(f"/v1/sessions/{other_sid}")


def test_numbered_names_sort_as_numbers_and_odd_digits_are_text():
    from storm_vlm.utils import numbered_name_key

    names = ["seg_10.ts", "seg_2.ts", "seg_1².ts", "seg_١٢.ts", "seg_002.ts"]
    assert sorted(names, key=numbered_name_key)[:2] == ["seg_1².ts", "seg_2.ts"]  # "²" is not a digit here
    assert numbered_name_key("seg_١٢.ts")[1] == 12  # a decimal digit of another script is one
