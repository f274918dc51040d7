"""How `storm_vlm.video.load_video` reads media, one concern per module.

errors     VideoDecodeError and its two subclasses (timeout, cancelled)
limits     the pixel caps, the process-wide decode slots, a call's deadline and cancel check
container  opening a file safely (demuxer allow-list, local file only) and spotting truncation
readers    turning decoded frames into capped RGB: seeking, sequential and in-order readers
images     load_image: a still image file as upright RGB (EXIF orientation), raster formats only,
           for every reader of image files (processor, server, training records, frame folders)

The public names of video loading live in `storm_vlm.video`; nothing here imports PyAV or torch
at import time.
"""
