"""The engine: host-side bookkeeping (sequence, block_manager, prefix_cache, scheduler, output_processor;
plain Python) and the device side (model_runner, llm_engine). Import the device modules directly: this
package import stays free of JAX so the scheduler can be used and tested on its own."""
from jpaged.engine.block_manager import BlockManager
from jpaged.engine.prefix_cache import PrefixCache
from jpaged.engine.scheduler import ScheduledBatch, ScheduledSeq, Scheduler
from jpaged.engine.sequence import Sequence, SequenceStatus

__all__ = ["BlockManager", "PrefixCache", "ScheduledBatch", "ScheduledSeq", "Scheduler", "Sequence",
           "SequenceStatus"]
