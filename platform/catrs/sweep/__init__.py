"""What a sweep is, without Ray: `catrs tune NAME|FILE.yaml`.

- `space`: the search-space file and its validation (method, data, schedule, ranges, protocols, budget).
- `proxy`: the cheap certification of the val split that each trial reports.
- `trial`: what the sweep knows of a trial (its result, the events it is told), whoever runs it.
- `selection`: the choice on val (shortlist, validation) and the one look at test.
- `story`: the MLflow records (a parent run, a child per trial, the names and notes that tell the story).
- `console`: the progress bar and the outcome printed at the end.
- `report`: the trade-off report of a finished sweep (`catrs report --sweep`).
- `run`: the sweep from start to end; the trials themselves run on Ray Tune (`catrs.distributed.tune`).
"""
