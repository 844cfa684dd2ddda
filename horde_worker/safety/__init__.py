"""Safety: every image is checked for NSFW and CSAM before anything leaves the worker.

`clip_model.py` loads the horde's CLIP (ViT-L/14) and answers image-text similarities;
`process.py` is the safety process (its own process, on the GPU with `safety_on_gpu`) that
runs the horde's own checker (the `horde_safety` package) on those similarities;
`censor.py` (no torch) decides, per image, what is submitted: the image, or a censor image
with the state and gen_metadata the horde reads.
"""
