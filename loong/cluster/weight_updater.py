"""An instance's side of weight updates: the control messages that change its model's weights.

Owns: `WeightUpdater.handle(msg)` for UpdateWeights (tensors that came with the message),
JoinWeightGroup (join the trainer's torch.distributed weight-update group,
`loong.weight_sync`) and ReceiveWeights (receive the trainer's broadcast and load it), each
answered with a problem string or None. Used by instance processes (`instance_main.py`) and
by the in-process cluster of one (`local_executor.py`), so both do the same.
Must not import: the engine, serving code or the scheduling policies.
"""
from __future__ import annotations

from loong.cluster.messages import JoinWeightGroup, ReceiveWeights, UpdateWeights
from loong.weight_sync import join_weight_group, receive_weights


class WeightUpdater:
    def __init__(self, model, rank: int) -> None:
        self.model, self.rank = model, rank
        self.group = None          # (store, process group) once joined

    def handle(self, msg) -> str | None:
        """Apply one weight message; None when done, else what went wrong."""
        try:
            if isinstance(msg, UpdateWeights):
                self.model.update_hf_weights(msg.weights)
            elif isinstance(msg, JoinWeightGroup):
                self.group = join_weight_group(msg.host, msg.port, msg.world_size, msg.rank,
                                               msg.timeout_s)
            elif isinstance(msg, ReceiveWeights):
                if self.group is None:
                    return (f"instance {self.rank}: not in a weight-update group; call "
                            f"init_weight_update_group first")
                _, pg = self.group
                self.model.update_hf_weights(receive_weights(pg, list(msg.names),
                                                             list(msg.dtypes),
                                                             [tuple(s) for s in msg.shapes]))
            else:
                return f"instance {self.rank}: not a weight message: {type(msg).__name__}"
            return None
        except Exception as e:      # noqa: BLE001 - reported to the manager
            return f"instance {self.rank}: {type(e).__name__}: {e}"
