"""The pack's ComfyUI nodes, one file per family. Importing this package imports nothing else: `node_list()` loads
the node files (which import ComfyUI's API), so `nodes.translate` and `nodes.paths` stay importable without
ComfyUI (the unit tests use them)."""


def node_list() -> list:
    from .apply import NODES as apply
    from .checkpoints import NODES as checkpoints
    from .dataset import NODES as dataset
    from .memory import NODES as memory
    from .models import NODES as models
    from .network import NODES as network
    from .optimizer import NODES as optimizer
    from .train import NODES as train

    return [*models, *dataset, *network, *optimizer, *memory, *train, *apply, *checkpoints]
