"""Real servers for tests: llama.cpp's OpenAI-compatible server and a fault-injecting proxy.

Neither imports pytest, so both can also back a benchmark or a manual session.
"""
