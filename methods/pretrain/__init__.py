"""Pretraining methods: a backbone learnt without the class-incremental protocol, saved for pretrain_path."""
