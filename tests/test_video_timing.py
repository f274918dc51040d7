"""Files as recorders and tools write them in the wild: animated GIFs with per-frame delays and
variable-frame-rate MPEG-TS (read frame by frame, yet sampled by time like an MP4), Matroska/WebM
and AVI written to a pipe (a browser's MediaRecorder, a live capture: no index, no duration, sizes
left unknown). Frames carry their own index (test_video)."""

import io

import av
import numpy as np
import pytest
from PIL import Image

from storm_vlm import load_video
from test_video import H, W, decoded_indices, encoder_available, index_frame
from test_video_variants import nearest_frames, write_timed

# 10 frames 0.1 s apart, the 11th held 5 s (a pause in a screen recording, a GIF's long frame), 9 more
TIMES_MS = [100 * i for i in range(11)] + [6000 + 100 * i for i in range(9)]


def write_gif(path, times_ms):
    """Index frame i shown at times_ms[i] (each frame's delay the gap to the next; the last 0.1 s)."""
    frames = [Image.fromarray(index_frame(i)) for i in range(len(times_ms))]
    delays = np.diff(times_ms).tolist() + [100]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=delays, loop=0)
    return path


class Pipe(io.RawIOBase):
    """A file that can only be written forward, as a pipe: a muxer cannot go back to fill in sizes,
    durations or an index."""

    def __init__(self, file):
        self.file = file

    def writable(self):
        return True

    def write(self, data):
        return self.file.write(data)


def write_streamed(path, n, fmt, codec="mpeg4"):
    """n index frames at 10 fps, a keyframe every 10, muxed as `fmt` through a Pipe."""
    with open(path, "wb") as file, av.open(Pipe(file), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=10, options={"g": "10"})
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(index_frame(i), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("suffix", ["gif", "ts"])
def test_a_variable_frame_rate_read_frame_by_frame_is_sampled_by_time(tmp_path, suffix):
    # GIF and MPEG-TS are decoded whole (no exact seeking): the frames sampled, the clip [start, end)
    # and one frame per second in fps mode must still follow the time line, as they do for an MP4.
    path = tmp_path / f"vfr.{suffix}"
    write_gif(path, TIMES_MS) if suffix == "gif" else write_timed(path, TIMES_MS)
    for kwargs in ({"num_frames": 8}, {"num_frames": 4, "start": 5.5, "end": 6.5}, {"num_frames": 50, "fps": 1}):
        clip = load_video(path, **kwargs)
        assert clip.extra["reader"] == "SequentialReader"
        got = decoded_indices(clip)
        assert got == nearest_frames(clip, TIMES_MS), kwargs
        np.testing.assert_allclose(clip.timestamps, np.asarray(TIMES_MS)[got] / 1000, atol=1e-3)
    assert 10 in got and 11 in got  # one frame per second: the held frame, then the one after the pause


@pytest.mark.parametrize("fmt,codec", [
    ("matroska", "mpeg4"),
    pytest.param("webm", "libvpx", marks=pytest.mark.skipif(not encoder_available("libvpx"), reason="no libvpx")),
])
def test_a_matroska_recording_without_index_or_duration_is_not_decoded_whole(tmp_path, fmt, codec):
    # What a browser's MediaRecorder or a live capture writes: no Duration and no Cues. The frame
    # count comes from the last keyframe (found by reading packets), and sampling seeks.
    path = write_streamed(tmp_path / f"rec.{fmt}", 300, fmt, codec)
    with av.open(str(path)) as container:
        assert container.duration is None and len(container.streams.video[0].index_entries) <= 1
    clip = load_video(path, num_frames=4)
    assert decoded_indices(clip) == [0, 100, 199, 299] and clip.num_source_frames == 300
    assert clip.extra["decoded"] < 100  # not the 300 frames of the stream, let alone twice


def test_an_avi_written_to_a_pipe_is_not_called_truncated(tmp_path):
    # Its RIFF size is left at 0xFFFFFFFF ("unknown"), as Matroska's unknown segment size: the file
    # is whole, and ffmpeg and players read it.
    path = write_streamed(tmp_path / "capture.avi", 30, "avi")
    assert path.read_bytes()[4:8] == b"\xff\xff\xff\xff"
    clip = load_video(path, num_frames=4)
    assert decoded_indices(clip) == [0, 10, 19, 29] and not clip.truncated
