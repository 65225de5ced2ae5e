"""Edge split training (paper 1): the body of split models, served to many devices.

``engine`` runs the body on a torch device (pinned double-buffered staging, side-stream
copies, bf16 autocast on CUDA; the same code on the CPU); ``session`` serves one
session's devices over the bus with dynamic batching; ``task`` is the body of the Celery
task ``fedmq.edge.session`` on the ``edge`` queue. Import the submodules themselves.
"""
