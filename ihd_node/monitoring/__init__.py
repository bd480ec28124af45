"""Does the model work here? Local performance against the radiologists' reads, and drift of the input mix
and the scores after go-live (issue 19). Floor 7: imports store, config and the shared modules; the web
console, the node and the commands import it."""
