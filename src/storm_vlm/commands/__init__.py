"""One module per `storm-vlm` subcommand: add_arguments(parser) and run(args) -> int."""
