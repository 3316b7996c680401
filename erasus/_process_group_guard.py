"""Keep torch from holding the default process group past ``destroy_process_group``.

torch.distributed.nn.functional binds ``group.WORLD`` into its functions' default arguments when it is first
imported. Imported after init_process_group (transformers' model modules import it, through torch._dynamo), it
keeps the default ProcessGroupGloo alive past destroy_process_group, so its worker threads are never joined and
one may still drop a finished collective's tensors while the interpreter shuts down: taking the GIL there ends
the thread inside a noexcept destructor and aborts the process ("terminate called without an active
exception"; 7 of 110 processes of a minimal script on a busy 2-core machine, none with this import first).
Importing this module before any group exists makes those defaults None. It never imports torch.distributed.nn
once a group exists: that would capture it. erasus.distributed and erasus.integrations.accelerated import it.
"""
import torch.distributed as dist

if dist.is_available() and not dist.is_initialized():
    import torch.distributed.nn  # noqa: F401
