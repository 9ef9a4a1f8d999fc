"""Scored demonstrations and studies run by the Makefile (`make lora-demo`, `make cascade-demo`, ...): not library
code; each trains with the library and scores what it made."""
