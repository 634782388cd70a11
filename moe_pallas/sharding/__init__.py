"""Expert parallelism: the full E-expert layer with its experts sharded over an `'expert'` mesh axis.

Modules: `api` (`moe_layer_sharded`: the gate, capacities, the call), `dispatch` (where each token goes:
bucket slots, ragged offsets, capacities; pure functions), `program` (the per-shard program and its
`shard_map`; `program.ragged_all_to_all` is the collective it calls, which CPU tests substitute).
The single-device computation it must equal is `moe_pallas.moe_layer_all_experts`.

`moe_layer_sharded` runs SPEC.md's function over all E global experts on a device mesh with `jax.shard_map`
and XLA collectives (NCCL on GPUs). Tokens are split over the expert axis (and over an optional data axis);
expert `e` lives on expert-axis index `e // E_local`, E_local = E / (expert axis size). Each shard routes its
own tokens over all E experts, the tokens travel to the shards that own their picks, each shard runs its
E_local experts with `local_expert_offset = axis_index * E_local` (`plan_local` + `apply_local_experts`,
the single-rank layer's pieces), the float32 partial outputs travel back and are added in float32, and the
sum is rounded to bfloat16 once (SPEC.md step 7).

Strategies (`strategy=`), all exact:

- `"all_gather"`: all-gather every shard's tokens, compute the local experts for all of them, `psum_scatter`
  the float32 partials back. The baseline.
- `"all_to_all"`: send each token only to the shards that own at least one of its picks, with
  `lax.all_to_all` into fixed buckets of `capacity` tokens per (source, destination) pair, and send the
  results back the same way. A token goes to a destination once, however many of its picks live there.
  Overflow never drops a token: when any bucket on any shard would exceed `capacity`, every shard (the
  predicate is reduced over the mesh, so all agree) runs the all-gather strategy for this call instead,
  under a `lax.cond`; `return_stats=True` reports it.
- `"ragged_all_to_all"`: the same dispatch with `lax.ragged_all_to_all`, which sends no padding; its buffers
  are sized for the worst case, so it cannot overflow. XLA:CPU does not implement the collective
  ("UNIMPLEMENTED: HLO opcode `ragged-all-to-all` is not supported by XLA:CPU", jax 0.11.2), so this
  strategy is for GPUs; on CPU meshes it raises NotImplementedError naming the alternative.

Bytes on the wire per token (from the code below; H hidden, B = 128, k = top_k, P expert-axis size):
one token row is `row_bytes = H + 4 H/B + 8 k` (fp8 activations, float32 block scales, int32 expert ids,
float32 weights; 7456 B for DeepSeek-V3) and one result row is `4 H` (float32 partial, 28672 B). Results
travel in float32 because SPEC.md rounds the sum, not the partials.

- all_gather: `(P - 1) * (row_bytes + 4 H)` per token (each row reaches every peer; the reduce-scatter
  moves `(P - 1) / P` of the `[P T_local, H]` float32 partials per shard). DeepSeek-V3, P = 8: 252,896 B.
- all_to_all: `(P - 1) * (C / T_local) * (row_bytes + 4 H)`, padding included, with the capacity C below.
  DeepSeek-V3, P = 8 (a token reaches at most 4 shards), capacity_factor 1.25: C = 0.625 T_local, 158,060 B.
- ragged_all_to_all: `(remote destinations of the token) * (row_bytes + 4 H)`, no padding: at most
  `min(P - 1, D) * 36,128` B for DeepSeek-V3 (D below; 144,512 B at P = 8), and 126,448 B on average for
  tokens that reach 4 shards of 8 when 7/8 of the shards are remote.

Capacity of the all_to_all buckets: a token reaches at most D = min(P, top_k, the shards spanned by the
topk_group widest groups) destinations, so a bucket holds T_local * D / P tokens on average at most, and
C = min(T_local, ceil(capacity_factor * T_local * D / P)). C = T_local cannot overflow (one bucket holds
every token) and is what small T_local and P <= 2 get; with it, all_to_all moves as many bytes as
all_gather, so the byte savings start at P > 2 (at P = 2 the ragged strategy saves only the tokens whose
picks all stay home). An overflowing call costs what all_gather costs.
"""

from moe_pallas.sharding.api import STRATEGIES, moe_layer_sharded
from moe_pallas.sharding.dispatch import (DEFAULT_CAPACITY_FACTOR, DispatchStats, RaggedLayout, bucket_capacity,
                                          bucket_slots, max_destinations_per_token, ragged_layout)

__all__ = ["DEFAULT_CAPACITY_FACTOR", "DispatchStats", "RaggedLayout", "STRATEGIES", "bucket_capacity", "bucket_slots",
           "max_destinations_per_token", "moe_layer_sharded", "ragged_layout"]
