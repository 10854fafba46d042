"""Speed claims: the fast paths on and off, side by side in one process (speed), data-parallel scaling over 1 and
N processes (ddp_scaling), the shared training loop against a bare PyTorch loop (engine_overhead)."""
