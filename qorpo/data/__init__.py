"""Preference data, from a file or hub dataset to training batches.

sources.py  read rows (local files, hub datasets)     formats.py  detect the layout, row -> Pair
encode.py   chat template, tokenization, prompt_ids    prepare.py  length policy, eval split
report.py   drop table and token lengths               collate.py  batches for the trainer
placement.py  where pairs go in a batch's rows (torch-free; the collator and the memory plan)
"""
