"""How statuses look in every renderer: colour never alone, always a symbol too."""

COLOURS = {"pass": "#2da44e", "fail": "#cf222e", "known": "#bf8700", "error": "#8250df", "skipped": "#8c959f"}
SYMBOLS = {"pass": "✓", "fail": "✗", "known": "!", "error": "E", "skipped": "–"}
RICH = {"pass": "green", "fail": "bold red", "known": "yellow", "error": "magenta", "skipped": "dim"}
SERIES = ("#0969da", "#cf222e", "#2da44e", "#bf8700", "#8250df", "#1b7c83", "#e16f24", "#6e7781")  # chart lines
