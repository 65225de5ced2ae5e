"""The aggregation pipeline: decode ahead of the fold, and fold on a torch device.

The first paper's core idea made real for aggregation: while update k is being folded,
update k+1 is decoded (``readahead``: a background thread a bounded distance ahead) and,
on a GPU, copied to the device (``folder``: pinned double-buffered host staging, copies on
a side CUDA stream, the float64 accumulation on a compute stream). ``device`` parses and
resolves the worker's device setting; ``staging`` holds the flat tensor layout and the
buffer rotation, pure logic tested on the CPU.

Import the submodules themselves: this package's ``__init__`` stays empty so that
``workers.config`` can use ``device``'s name check without importing torch.
"""
