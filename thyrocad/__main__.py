from thyrocad.cli import main

main()
