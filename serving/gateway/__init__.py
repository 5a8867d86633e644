"""The gateway in front of the predictor servers: a KServe transformer-shaped process that speaks the same
OpenAI-compatible and OIP v2 APIs. Its parts are modules with interfaces testable without HTTP: the
semantic cache (`cachelayer`) today; precision routing, canary splits and replica balancing next."""
