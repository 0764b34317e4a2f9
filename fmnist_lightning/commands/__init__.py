"""One module per subcommand: Lightning's four (fit, validate, test, predict) and this project's tools."""
