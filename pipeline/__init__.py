"""Stage graph, runner, typed config, artifact store, CLI, public API and HTTP service."""
