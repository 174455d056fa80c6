"""OpenAI-compatible serving: `lightspeed serve` (launch.py), the app (openai.py), request
handling (serving.py), schemas (protocol.py), the engine loop (async_engine.py), metrics."""
