"""The four stages of a margin build: planning -> mapping -> reducing -> finishing."""
