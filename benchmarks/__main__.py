from benchmarks.tutorial import main

main()
