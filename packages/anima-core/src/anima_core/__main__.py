from anima_core.cli import main

main()
