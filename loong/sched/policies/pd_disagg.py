"""PDDisaggPolicy: prefill-decode disaggregation (the DistServe baseline).

Fixed prefill replicas run prefill-only iterations of whole prompts; when a prompt is done
(its first token sampled) its KV moves to the decode replica with the most room, as
migrations of each prefill member's shard, and decoding goes on there. Decode replicas
run decode-only iterations; a request preempted there is recomputed on a prefill replica.
A request waits on its prefill replica, holding its KV, until some decode replica has
room for it. The transfer overlaps the replicas' compute unless they are idle
(see the simulator). The paper's setting: prefill TP4 and decode TP2 x PP2 on one
8-GPU node, i.e. two replicas of two of our TP2 instances (`prefill_instances` = 2).
Extends `ReplicaPolicy` through its extension points only (`before_replicas`,
`is_decoding`, `room`, `move_shard`, `in_flight`). Pure Python: imports only
`replica_batching` and `placement` of loong; never imports torch.
"""
from __future__ import annotations

import dataclasses

from loong.sched.policies.placement import ReplicaRequest, blocks
from loong.sched.policies.replica_batching import ReplicaConfig, ReplicaPolicy


class PDDisaggPolicy(ReplicaPolicy):
    def __init__(self, cfg: ReplicaConfig, prefill_instances: int, decode_replica_size: int | None = None
                 ) -> None:
        n = cfg.num_instances
        if not 0 < prefill_instances < n:
            raise ValueError(f"prefill_instances: must be between 1 and {n - 1}, got {prefill_instances}")
        kp = cfg.replica_size
        kd = decode_replica_size or kp
        if prefill_instances % kp or (n - prefill_instances) % kd:
            raise ValueError(f"prefill_instances: {prefill_instances} prefill and "
                             f"{n - prefill_instances} decode instances must split into "
                             f"replicas of {kp} and {kd}")
        reps = [tuple(range(i, i + kp)) for i in range(0, prefill_instances, kp)]
        roles = ["prefill"] * len(reps)
        reps += [tuple(range(i, i + kd)) for i in range(prefill_instances, n, kd)]
        roles += ["decode"] * (len(reps) - len(roles))
        super().__init__(dataclasses.replace(cfg, token_budget=None), reps, roles)

    def before_replicas(self) -> None:
        """Move finished prompts' KV to decode replicas, oldest first, while one has room."""
        for i, role in enumerate(self.roles):
            if role != "prefill":
                continue
            for r in sorted(self.running[i].values(), key=lambda r: r.seq):
                if not self.is_decoding(r) or r.rid in self.in_flight:
                    continue
                dst = self._decode_target(r)
                if dst is None:
                    return                      # FCFS: later ones wait too
                self._transfer(r, i, dst)

    def _decode_target(self, r: ReplicaRequest) -> int | None:
        bs = self.cfg.block_size
        need = blocks(r.computed, bs) + len(r.placement)     # + room for a few tokens
        best = None
        for j, role in enumerate(self.roles):
            if role != "decode" or len(self.running[j]) >= self.cfg.max_num_seqs:
                continue
            members = self.replicas[j]
            cap = len(members) * self.cfg.blocks_per_instance
            free = sum(self.free(m) for m in members) - int(self.cfg.watermark * cap)
            if need <= free and (best is None or free > best[0]):
                best = (free, j)
        return None if best is None else best[1]

    def _transfer(self, r: ReplicaRequest, src_rep: int, dst_rep: int) -> None:
        dst_members = self.replicas[dst_rep]
        moved = 0
        for src, t in sorted(r.placement.items()):
            left = t
            while left:
                dst = max(dst_members, key=lambda m: (self.room(r, m), -m))
                x = min(left, self.room(r, dst))
                self.move_shard(r, src, dst, x)     # the source shard's tail moves
                left -= x
                moved += x
            r.placement.pop(src, None)
        del self.running[src_rep][r.rid]
        r.replica = dst_rep
        self.running[dst_rep][r.rid] = r
        self.stats["transfers"] += 1
        self.stats["transferred_tokens"] += moved
