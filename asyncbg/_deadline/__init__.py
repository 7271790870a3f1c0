"""The cheapest way to meet a deadline: each line on a batch, on flex or in the background.

``_policy`` decides (which way a line starts on, when it must leave it), ``_journal`` names a
line's jobs in the journal (one key per way) and reads them back as one record per line,
``_costs`` says what each way cost against the same usage at full price, and ``_manager`` runs
it: :class:`~asyncbg.DeadlineManager`.
"""
