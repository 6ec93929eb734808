"""The service: settings, logging, metrics, HTTP, hosting, workers and the command line."""
