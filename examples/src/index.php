<?php
require __DIR__ . '/../vendor/autoload.php';
require __DIR__ . '/lib/Greeting.php';
require __DIR__ . '/Controller/HomeController.php';

echo (new App\Controller\HomeController())->index();
