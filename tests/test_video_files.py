"""Which files load_video opens: only self-contained formats, only the file
it is given. A playlist naming another file must fail *without opening that file*: the named
file is a FIFO here, and a watcher thread notices any reader that opens it (opening a FIFO for
reading blocks until a writer comes, so no open can slip by unseen)."""

import errno
import os
import threading
import time

import av
import numpy as np
import pytest
from PIL import Image

from storm_vlm import VideoDecodeError, load_video
from storm_vlm.video import ALLOWED_FORMATS
from test_video import H, W, decoded_indices, index_frame, write_video


class FifoWatch:
    """A FIFO at `path`; `opened` becomes True if anyone opens it for reading."""

    def __init__(self, path):
        self.path = str(path)
        os.mkfifo(self.path)
        self.opened = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader has it open
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                time.sleep(0.005)
                continue
            self.opened = True
            os.close(fd)  # the reader sees an empty file

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def write_ts(path, n=20):
    return write_video(path, n, "mpeg4", fmt="mpegts")


def test_hls_playlist_naming_a_server_file_is_refused_unopened(tmp_path):
    target = tmp_path / "secret.ts"
    playlist = tmp_path / "upload.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{target}\n#EXT-X-ENDLIST\n")
    with FifoWatch(target) as watch:
        with pytest.raises(VideoDecodeError) as info:
            load_video(playlist, num_frames=4)
    assert not watch.opened, "the playlist's segment was opened"
    assert "HLS playlist" in str(info.value) and str(playlist) in str(info.value)


def test_hls_playlist_of_a_real_file_does_not_reveal_it(tmp_path):
    # The same playlist naming a decodable .ts (or a missing one) gives the same refusal: an
    # upload cannot learn whether a path exists on the server, or read it.
    real = write_ts(tmp_path / "real.ts")
    messages = []
    for name, target in (("a.m3u8", real), ("b.m3u8", tmp_path / "missing.ts")):
        playlist = tmp_path / name
        playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{target}\n#EXT-X-ENDLIST\n")
        with pytest.raises(VideoDecodeError) as info:
            load_video(playlist, num_frames=2)
        messages.append(str(info.value).replace(str(playlist), "<upload>"))
    assert messages[0] == messages[1]
    assert decoded_indices(load_video(real, num_frames=3)) == [0, 10, 19]  # a plain .ts still loads


def test_ffconcat_lists_are_refused_unopened(tmp_path):
    (tmp_path / "self.ffconcat").write_text("ffconcat version 1.0\nfile self.ffconcat\n")
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(VideoDecodeError, match="ffconcat"):
        load_video(tmp_path / "self.ffconcat", num_frames=2)
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 1
    listing = tmp_path / "list.ffconcat"
    listing.write_text("ffconcat version 1.0\nfile clip.mp4\n")
    with FifoWatch(tmp_path / "clip.mp4") as watch:
        with pytest.raises(VideoDecodeError) as info:
            load_video(listing, num_frames=2)
    assert not watch.opened, "the listed file was opened"
    assert "ffconcat" in str(info.value)


def test_only_regular_files_are_read(tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    with pytest.raises(VideoDecodeError, match="not a regular file"):
        load_video(fifo)  # would block forever if opened
    with pytest.raises(VideoDecodeError, match="not a regular file"):
        load_video("/dev/zero")


def test_names_are_files_never_protocols(tmp_path, monkeypatch):
    path = write_video(tmp_path / "clip:10.mp4", 6, "mpeg4")
    monkeypatch.chdir(tmp_path)
    assert decoded_indices(load_video("clip:10.mp4", num_frames=3)) == [0, 2, 5]  # "clip:" is no protocol
    with pytest.raises(VideoDecodeError, match="no such file"):
        load_video(f"concat:{path}|{path}")


def test_image_sequence_patterns_are_not_expanded(tmp_path):
    # A JPEG whose first segments are long is probed by FFmpeg's image2 demuxer (by its
    # extension), which reads a name like img%d.jpg as the sequence img0.jpg, img1.jpg, ...
    def save(name, index):
        Image.fromarray(index_frame(index)).save(tmp_path / name, quality=95, comment=b"x" * 3000)

    for i in range(3):
        save(f"img{i}.jpg", i)
    save("img%d.jpg", 7)  # a file really named so
    with av.open(str(tmp_path / "img0.jpg")) as container:
        assert container.format.name == "image2"
    clip = load_video(tmp_path / "img%d.jpg")
    assert clip.is_image and decoded_indices(clip) == [7]  # that one file, not img0.jpg
    assert decoded_indices(load_video(tmp_path / "img1.jpg")) == [1]


def test_allowed_formats_cover_common_files_and_no_reference_formats():
    assert {"mov", "mp4", "matroska", "webm", "avi", "mpegts", "png_pipe", "jpeg_pipe"} <= ALLOWED_FORMATS
    assert not {"hls", "concat", "dash", "webm_dash_manifest", "tee", "lavfi", "sdp", "rtsp"} & ALLOWED_FORMATS
    assert ALLOWED_FORMATS <= set(av.formats_available) | {"mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska"}


@pytest.mark.parametrize("suffix,fmt", [("mkv", "matroska"), ("avi", "avi"), ("ts", "mpegts"), ("webm", "webm")])
def test_common_containers_still_load(tmp_path, suffix, fmt):
    codec = "libvpx" if suffix == "webm" else "mpeg4"
    if codec not in av.codecs_available:
        pytest.skip(f"no {codec} encoder")
    path = tmp_path / f"v.{suffix}"
    write_video(path, 12, codec, fmt=fmt)
    clip = load_video(path, num_frames=4)
    assert clip.frames.shape == (4, H, W, 3) and clip.num_source_frames == 12
    assert np.all(np.diff(clip.indices) > 0)
