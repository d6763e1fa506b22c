from mclx.cli import main

main()
