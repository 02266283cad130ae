"""Image size, cluster size and copier speeds of the tests under real faults (faultfs,
a full tmpfs)."""

SIZE = 4 << 20
CLUSTER = 64 << 10
BATCH = 1 << 20
"""The copier's largest single copy (blockcopy.BATCH_BYTES): a copier error names its start."""
FAST = "16M"
"""Still copying when the mount returns; the whole image in a quarter of a second."""
PACED = "1M"
"""The copier's two workers copy a batch each at once, then one MiB a second: the last
MiB of the image is surely not copied within the first 1.5 seconds."""
