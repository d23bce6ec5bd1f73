"""Tools that drive a running Loong from outside: load and soak generators, harnesses."""
