"""THE training loop and THE inference loop, split by job:

- `engine`: `Engine.train` runs a task's stages, `Engine.fit` one stage, `Engine.infer` an inference pass;
- `batches`: an epoch's seeded order and augmentation, and its split between the processes of a run;
- `optim`: the optimiser and schedule a stage's `OptimConfig` asks for, and the check of a saved optimiser state;
- `ddp`: what several processes add (the step through DistributedDataParallel, synchronised batch norm, putting
  a sharded inference pass back in order);
- `fastpath`: the fast paths a device supports (bfloat16 autocast, channels-last);
- `hooks`: what the engine and the task loop call (after every epoch, task and seed).

No method writes a loop of its own; a method asks the engine only for inference passes (`Engine.infer`, typed
as utils.types.Inference).
"""
