from run.bench import main

main()
