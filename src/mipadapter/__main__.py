from mipadapter.cli.main import entry

entry()
