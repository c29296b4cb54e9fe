from titans_train.cli import main

raise SystemExit(main())
