"""The teach job: a teacher model improves answers and training data for a student (see README).

``dcr``: Draft-Critique-Revise over a JSONL file of items (``localforge teach dcr``);
``settings``: the one settings object (``TeachSettings``), teacher and student as sections.
It imports no engine: both models are reached through ``localforge.backends``.
"""
