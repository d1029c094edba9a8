"""Fine-tuning: strategies (optax label trees), schedules, the jitted train step, the fit loop,
data parallelism (docs/architecture.md)."""
from molfun_jax.training.distributed import (data_mesh, initialize, is_primary, replicate, shard_batch, sync,
                                             to_host)
from molfun_jax.training.fit import (TRUNK_MERGED_DIMS, FitResult, cache_entry_bytes, cache_trunk, count_steps,
                                     evaluate, fit, make_batches, predict_all, target_norm)
from molfun_jax.training.guard import (MAX_SKIPPED_STEPS, NonFiniteInputError, SkippedStepsError,
                                       check_finite_examples)
from molfun_jax.training.memory import release_host_memory, reusing_host_buffers, synchronous_cpu_dispatch
from molfun_jax.training.schedules import layer_decay_factors, make_schedule, steps_per_epoch
from molfun_jax.training.step import (AffinityModel, eval_params, init_state, make_predict_step, make_single_step,
                                      make_train_step, with_dtype)
from molfun_jax.training.strategies import (STRATEGIES, Full, HeadOnly, LoRA, Option, Partial, Plan, Rule, Strategy,
                                            StrategyError, register_strategy, strategy_from_dict)

__all__ = ["AffinityModel", "FitResult", "Full", "HeadOnly", "LoRA", "MAX_SKIPPED_STEPS", "NonFiniteInputError",
           "Partial", "Plan", "Rule", "STRATEGIES", "SkippedStepsError", "Strategy", "TRUNK_MERGED_DIMS",
           "cache_entry_bytes", "cache_trunk", "check_finite_examples", "count_steps", "data_mesh", "eval_params",
           "evaluate", "fit", "init_state",
           "initialize", "is_primary", "layer_decay_factors", "make_batches", "make_predict_step", "make_schedule",
           "make_single_step", "make_train_step", "predict_all", "release_host_memory", "replicate",
           "reusing_host_buffers", "shard_batch", "steps_per_epoch", "synchronous_cpu_dispatch",
           "strategy_from_dict", "sync", "to_host", "with_dtype", "Option", "StrategyError", "register_strategy",
           "target_norm"]
