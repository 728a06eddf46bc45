# Root conftest: pytester drives plugin-behaviour tests in a throw-away project.
pytest_plugins = ["pytester"]
