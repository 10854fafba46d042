"""Single-step methods: one task holding every class. Joint training (`finetune_normal`) is the Finetune
class of methods/multi_steps/finetune_il.py, registered a second time with method_type single_step."""
