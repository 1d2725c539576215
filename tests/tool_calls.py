"""Running a tool's `main(argv)` in the test process."""


def call(main, argv: list, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a tool's main(argv), run in this process."""
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
